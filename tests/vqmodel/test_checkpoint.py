"""Checkpoints: exact round trip (weights AND quantizer buffers), exact resume, no unpickling,
atomic writes, clear errors for corrupt or mixed files."""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

from vqmodel.checkpoint import (
    CONFIG_FILE,
    MANIFEST_FILE,
    TRAINING_STATE_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    capture_rng_state,
    load_metadata,
    load_model,
    load_training_state,
    restore_rng_state,
    save_checkpoint,
    write_bytes_atomic,
)
from vqmodel.vqvae import VQVAE, ModelConfig

# every kind of quantizer buffer: k-means flag, step/unused counters, running moments
CONFIG = ModelConfig(
    downsample=4,
    base_channels=8,
    channel_mult=(1, 2),
    code_dim=4,
    image_size=16,
    quantizer={
        "num_codes": 16,
        "affine": "running",
        "kmeans_init": True,
        "kmeans_samples": 32,
        "replace_freq": 2,
    },
)


def _batch(seed: int) -> torch.Tensor:
    return torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _train(model: VQVAE, opt: torch.optim.Optimizer, steps: range) -> None:
    model.train()
    for step in steps:
        x = _batch(step)
        recon, info = model(x)
        loss = F.mse_loss(recon, x) + info["loss"] + 1e-3 * torch.randn(()).abs()
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.fixture
def trained() -> tuple[VQVAE, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = VQVAE(CONFIG)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.quantizer.attach_optimizer(opt)
    _train(model, opt, range(4))
    return model, opt


def _files(path: Path) -> set[str]:
    return {p.name for p in path.iterdir()}


def test_round_trip_gives_identical_weights_buffers_and_outputs(
    tmp_path: Path, trained: tuple[VQVAE, torch.optim.Optimizer]
) -> None:
    model, _ = trained
    book = model.quantizer.codebooks[0]
    # the buffers really moved away from their initial values, so the comparison means something
    assert bool(book.kmeans_done) and int(book.steps) > 0 and bool(book.affine.initialised)

    save_checkpoint(tmp_path, model, metadata={"step": 4})
    loaded, config = load_model(tmp_path)

    assert config == CONFIG and not loaded.training
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for key, value in original.items():
        assert restored[key].dtype == value.dtype, key
        assert torch.equal(restored[key], value), key
    model.eval()
    x = _batch(99)
    tokens = model.encode(x)
    assert torch.equal(loaded.encode(x), tokens)
    assert torch.equal(loaded.decode(tokens), model.decode(tokens))
    assert load_metadata(tmp_path) == {"step": 4}


def test_resume_continues_exactly_like_an_uninterrupted_run(
    tmp_path: Path, trained: tuple[VQVAE, torch.optim.Optimizer]
) -> None:
    model, opt = trained
    # advance every RNG the state must capture
    random.random()
    np.random.rand()
    save_checkpoint(
        tmp_path,
        model,
        training_state={"step": 4, "optimizer": opt.state_dict(), "rng": capture_rng_state()},
    )
    _train(model, opt, range(4, 8))
    expected = (model.state_dict(), random.random(), float(np.random.rand()))

    resumed, _ = load_model(tmp_path)
    state = load_training_state(tmp_path)
    resumed_opt = torch.optim.Adam(resumed.parameters(), lr=1e-3)
    resumed_opt.load_state_dict(state["optimizer"])
    resumed.quantizer.attach_optimizer(resumed_opt)
    restore_rng_state(state["rng"])
    assert state["step"] == 4
    _train(resumed, resumed_opt, range(4, 8))

    for key, value in expected[0].items():
        assert torch.equal(resumed.state_dict()[key], value), key
    assert (random.random(), float(np.random.rand())) == expected[1:]


def test_files_on_disk_are_safetensors_json_and_nothing_else(
    tmp_path: Path, trained: tuple[VQVAE, torch.optim.Optimizer]
) -> None:
    model, opt = trained
    save_checkpoint(tmp_path, model, training_state={"optimizer": opt.state_dict()})
    assert _files(tmp_path) == {CONFIG_FILE, WEIGHTS_FILE, TRAINING_STATE_FILE, MANIFEST_FILE}
    weights = safetensors.torch.load_file(tmp_path / WEIGHTS_FILE)
    assert weights["quantizer.codebooks.0.unused_steps"].dtype == torch.int64
    assert weights["quantizer.codebooks.0.kmeans_done"].dtype == torch.bool
    assert ModelConfig.model_validate_json((tmp_path / CONFIG_FILE).read_text()) == CONFIG
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    assert set(manifest["files"]) == {CONFIG_FILE, WEIGHTS_FILE, TRAINING_STATE_FILE}


class _Payload:
    """Unpickling this object runs ``_record`` (a stand-in for arbitrary code execution)."""

    def __reduce__(self) -> tuple:
        return (_record, ("unpickled",))


RAN: list[str] = []


def _record(message: str) -> str:
    RAN.append(message)
    return message


def test_a_pickled_object_in_the_training_state_is_refused_unexecuted(
    tmp_path: Path, trained: tuple[VQVAE, torch.optim.Optimizer]
) -> None:
    model, _ = trained
    save_checkpoint(tmp_path, model, training_state={"step": 1})
    # an attacker (or an old tool) writes a pickle with a custom object, and even fixes the
    # manifest hash so only the weights_only rule stands in the way
    torch.save({"step": 1, "evil": _Payload()}, tmp_path / TRAINING_STATE_FILE)
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    data = (tmp_path / TRAINING_STATE_FILE).read_bytes()
    manifest["files"][TRAINING_STATE_FILE] = {
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
    }
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(manifest))

    RAN.clear()
    with pytest.raises(CheckpointError, match=rf"{TRAINING_STATE_FILE}: refused.*weights_only"):
        load_training_state(tmp_path)
    assert RAN == []
    # the same file under a plain torch.load really would have run the payload
    torch.load(tmp_path / TRAINING_STATE_FILE, weights_only=False)
    assert RAN == ["unpickled"]


def test_saving_an_unloadable_training_state_fails_before_writing(
    tmp_path: Path, trained: tuple[VQVAE, torch.optim.Optimizer]
) -> None:
    model, _ = trained
    with pytest.raises(TypeError, match="weights_only=True"):
        save_checkpoint(tmp_path / "ckpt", model, training_state={"evil": _Payload()})
    with pytest.raises(TypeError, match="JSON-serialisable"):
        save_checkpoint(tmp_path / "ckpt", model, metadata={"when": object()})
    assert not (tmp_path / "ckpt").exists()


def test_config_must_be_the_models_own(
    tmp_path: Path, trained: tuple[VQVAE, torch.optim.Optimizer]
) -> None:
    model, _ = trained
    other = CONFIG.model_copy(update={"image_size": 32})
    with pytest.raises(ValueError, match=r"config differs from model\.config"):
        save_checkpoint(tmp_path, model, other)
    save_checkpoint(tmp_path, model, CONFIG)  # the same config is fine
    with pytest.raises(CheckpointError, match="has no training state"):
        load_training_state(tmp_path)


def test_atomic_writes_leave_no_temp_files(
    tmp_path: Path, trained: tuple[VQVAE, torch.optim.Optimizer], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, opt = trained
    for _ in range(2):  # the second save replaces every file in place
        save_checkpoint(tmp_path, model, training_state={"optimizer": opt.state_dict()})
    assert _files(tmp_path) == {CONFIG_FILE, WEIGHTS_FILE, TRAINING_STATE_FILE, MANIFEST_FILE}
    assert oct((tmp_path / WEIGHTS_FILE).stat().st_mode & 0o777) == oct(0o644)

    # a failure at the rename keeps the old file intact and removes the temp file
    target = tmp_path / "file.bin"
    write_bytes_atomic(target, b"old")

    def failing_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_bytes_atomic(target, b"new")
    assert target.read_bytes() == b"old"
    assert _files(tmp_path) == {
        CONFIG_FILE,
        WEIGHTS_FILE,
        TRAINING_STATE_FILE,
        MANIFEST_FILE,
        "file.bin",
    }


def test_corrupt_weights_give_an_error_naming_the_file(
    tmp_path: Path, trained: tuple[VQVAE, torch.optim.Optimizer]
) -> None:
    model, _ = trained
    save_checkpoint(tmp_path, model)
    weights = tmp_path / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[:8] = (10**12).to_bytes(8, "little")  # header length field now points past the end
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS_FILE}: sha256 .* corrupt"):
        load_model(tmp_path)
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS_FILE}: not a readable safetensors"):
        load_model(tmp_path, verify=False)
    weights.write_bytes(bytes(data[: len(data) // 2]))  # truncated copy
    with pytest.raises(CheckpointError, match=WEIGHTS_FILE):
        load_model(tmp_path, verify=False)


def test_files_from_different_saves_are_detected(
    tmp_path: Path, trained: tuple[VQVAE, torch.optim.Optimizer]
) -> None:
    model, _ = trained
    save_checkpoint(tmp_path / "a", model)
    with torch.no_grad():
        model.decoder.conv_out.bias.add_(1.0)
    save_checkpoint(tmp_path / "b", model)
    # a crash between two files of a save looks like this: new weights, old manifest
    (tmp_path / "a" / WEIGHTS_FILE).write_bytes((tmp_path / "b" / WEIGHTS_FILE).read_bytes())
    with pytest.raises(CheckpointError, match="different save"):
        load_model(tmp_path / "a")


def test_weights_that_do_not_fit_the_config_name_both_files(
    tmp_path: Path, trained: tuple[VQVAE, torch.optim.Optimizer]
) -> None:
    model, _ = trained
    save_checkpoint(tmp_path, model)
    wider = CONFIG.model_copy(update={"base_channels": 16})
    (tmp_path / CONFIG_FILE).write_text(wider.model_dump_json())
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS_FILE} does not match .*{CONFIG_FILE}"):
        load_model(tmp_path, verify=False)
    (tmp_path / CONFIG_FILE).write_text('{"downsample": 6}')
    with pytest.raises(
        CheckpointError, match=rf"(?s){CONFIG_FILE}: invalid model config.*downsample=6"
    ):
        load_model(tmp_path, verify=False)


def test_rng_state_round_trip() -> None:
    state = capture_rng_state()
    first = (torch.rand(3), float(np.random.rand()), random.random())
    restore_rng_state(state)
    again = (torch.rand(3), float(np.random.rand()), random.random())
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]
