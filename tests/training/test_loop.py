"""The training loop on a tiny model: each mode learns, the optimisers own what they should, and
the run directory holds what the evaluation reads (metrics.jsonl, checkpoints, best, latest, tb)."""

from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from training.config import ConfigError, TrainConfig, load_config
from training.loop import build_optimizers, build_parts, lr_factor, train, train_step
from vqmodel import VQVAE, load_metadata, load_model, load_training_state

TINY = Path(__file__).resolve().parents[2] / "training" / "configs" / "tiny.yaml"
TRAIN_KEYS = {
    "step", "split", "loss", "recon", "vq", "psnr", "usage", "perplexity", "dead_codes", "lr",
    "sec_per_step",
}  # fmt: skip


@pytest.fixture(scope="module")
def bank_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "patch-bank-cache"


def tiny(out_dir: Path, cache: Path, *overrides: str) -> TrainConfig:
    base = [f"out_dir={out_dir}", f"data.cache_dir={cache}", "data.bank_size=256"]
    return load_config(TINY, [*base, *overrides])


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode", ["standard", "alternating", "inplace"])
def test_each_mode_reduces_reconstruction_loss(mode: str, tmp_path: Path, bank_cache: Path) -> None:
    config = tiny(tmp_path / "run", bank_cache, f"mode={mode}", "steps=30", "log_every=5")
    summary = train(config, progress=False)
    lines = read_metrics(tmp_path / "run")
    assert [line["step"] for line in lines] == [5, 10, 15, 20, 25, 30]
    assert lines[-1]["recon"] < 0.8 * lines[0]["recon"]
    assert summary["step"] == 30 and summary["stopped"] == "completed"
    assert summary["metrics"] == lines[-1]
    model, _ = load_model(summary["last_checkpoint"])
    assert model.config.quantizer.inplace is (mode == "inplace")


def test_alternating_codebook_optimizer_owns_the_codebook(tmp_path: Path) -> None:
    config = load_config(TINY, ["mode=alternating"])
    model = VQVAE(config.model)
    model_opt, codebook_opt = build_optimizers(model, config)
    codebook = {id(p) for p in model.quantizer.codebook_parameters()}
    in_model_opt = {id(p) for g in model_opt.param_groups for p in g["params"]}
    in_codebook_opt = {id(p) for g in codebook_opt.param_groups for p in g["params"]}
    assert in_codebook_opt == codebook and not in_model_opt & codebook
    assert in_model_opt | codebook == {id(p) for p in model.parameters()}
    assert codebook_opt.param_groups[0]["lr"] == config.optim.codebook_lr
    # standard: one optimizer over everything
    standard_opt, none = build_optimizers(model, load_config(TINY, ["mode=standard"]))
    assert none is None
    assert {id(p) for g in standard_opt.param_groups for p in g["params"]} == {
        id(p) for p in model.parameters()
    }


def test_alternating_training_moves_the_codebook_by_its_own_step(
    tmp_path: Path, bank_cache: Path
) -> None:
    # no k-means, no replacement, no sync: only step (1) can change the raw codes
    config = tiny(
        tmp_path / "run", bank_cache, "mode=alternating", "steps=6", "log_every=6",
        "model.quantizer.kmeans_init=false", "model.quantizer.replace_freq=0",
        "model.quantizer.sync_nu=0.0", "model.quantizer.affine=off",
    )  # fmt: skip
    torch.manual_seed(config.seed)
    initial = VQVAE(config.model).quantizer.codebooks[0].weight.detach().clone()
    summary = train(config, progress=False)
    trained = load_model(summary["last_checkpoint"])[0].quantizer.codebooks[0].weight.detach()
    moved = (trained - initial).norm(dim=1) > 1e-6
    assert moved.any()
    state = load_training_state(summary["last_checkpoint"])
    assert len(state["optimizers"]) == 2  # model optimizer + codebook optimizer
    assert state["optimizers"][1]["param_groups"][0]["lr"] < config.optim.codebook_lr  # cosine
    # the model step leaves no gradient on the codebook without sync: the codebook term is
    # step (1)'s alone, not applied a second time through the model loss
    assert all(grad is None or not grad.any() for grad in state["codebook_grads"])


def test_alternating_sync_gradient_waits_on_the_codebook_for_the_next_step(
    tmp_path: Path, bank_cache: Path
) -> None:
    config = tiny(tmp_path / "run", bank_cache, "steps=2", "log_every=2", "image_every=0")
    assert config.model.quantizer.sync_nu > 0
    state = load_training_state(train(config, progress=False)["last_checkpoint"])
    assert state["codebook_grads"][0] is not None and state["codebook_grads"][0].abs().sum() > 0


def test_run_directory_layout(tmp_path: Path, bank_cache: Path) -> None:
    run = tmp_path / "run"
    config = tiny(
        run, bank_cache, "steps=12", "log_every=3", "ckpt_every=4", "keep_last=2",
        "image_every=6", "mode=inplace",
    )  # fmt: skip
    summary = train(config, progress=False)

    assert load_config(run / "config.yaml") == config
    lines = read_metrics(run)
    assert [line["step"] for line in lines] == [3, 6, 9, 12]
    for line in lines:
        assert set(line) == TRAIN_KEYS and line["split"] == "train"
        assert 0 < line["usage"] <= 1 and line["perplexity"] >= 1
        assert line["dead_codes"] == round((1 - line["usage"]) * 64)

    checkpoints = run / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "best", "latest", "step_0000008", "step_0000012",
    ]  # fmt: skip
    assert os.readlink(checkpoints / "latest") == "step_0000012"
    assert summary["last_checkpoint"] == str(checkpoints / "step_0000012")
    assert summary["best_checkpoint"] == str(checkpoints / "best")
    state = load_training_state(checkpoints / "step_0000012")
    assert state["step"] == 12 and state["data"] == {"epoch": 0, "batch": 12}
    assert state["inner_optimizers"][0]["state"]  # the in-place step's Adam moments
    meta = load_metadata(checkpoints / "step_0000012")
    assert meta["step"] == 12 and meta["mode"] == "inplace" and meta["world_size"] == 1
    assert meta["device"].startswith("cpu") and meta["wall_s"] >= 0
    best_meta = load_metadata(checkpoints / "best")
    assert best_meta["train_recon"] == min(line["recon"] for line in lines)
    _, model_config = load_model(checkpoints / "best")
    assert model_config == config.model
    assert not (checkpoints / "best" / "training_state.pt").exists()

    # TensorBoard: scalars and reconstruction grids
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"), size_guidance={"images": 0}).Reload()
    tags = events.Tags()
    assert {"train/recon", "codebook/usage", "codebook/perplexity", "codebook/dead_codes"} <= set(
        tags["scalars"]
    )
    assert "affine/0/scale_mean" in tags["scalars"]  # tiny.yaml uses the learned affine
    assert [e.step for e in events.Scalars("train/recon")] == [3, 6, 9, 12]
    assert [e.step for e in events.Images("reconstruction")] == [6, 12]
    image = events.Images("reconstruction")[0]
    assert (image.width, image.height) == (8 * 16, 2 * 16)


def test_out_dir_with_checkpoints_needs_resume(tmp_path: Path, bank_cache: Path) -> None:
    config = tiny(tmp_path / "run", bank_cache, "steps=2", "log_every=1", "image_every=0")
    train(config, progress=False)
    with pytest.raises(ConfigError, match="--resume"):
        train(config, progress=False)
    # resuming keeps the architecture: a different model is refused before any work
    with pytest.raises(ConfigError, match="model: differs"):
        train(tiny(tmp_path / "run", bank_cache, "steps=4", "model.code_dim=4"), resume=True)
    # --resume of a finished run does nothing and reports the same place
    summary = train(config, resume=True, progress=False)
    assert summary["step"] == 2 and summary["sec_per_step"] is None


def test_time_limit_saves_and_stops(tmp_path: Path, bank_cache: Path) -> None:
    config = tiny(tmp_path / "run", bank_cache, "steps=1000", "time_limit_s=0.001")
    summary = train(config, progress=False)
    assert summary["stopped"] == "time_limit" and summary["step"] == 1
    assert load_training_state(summary["last_checkpoint"])["step"] == 1


def test_learning_rate_warms_up_then_decays_to_the_floor() -> None:
    optim = load_config(TINY, ["optim.warmup_steps=10", "optim.min_lr_ratio=0.1"]).optim
    factors = [lr_factor(step, optim, 100) for step in range(101)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(factors[9:]))
    assert factors[100] == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("where", "mode"),
    [("decoder", "standard"), ("decoder", "alternating"), ("encoder", "alternating"),
     ("encoder", "inplace")],
)  # fmt: skip
def test_non_finite_step_raises_before_any_weight_moves(
    where: str, mode: str, tmp_path: Path, bank_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # step 3's decoder output is NaN (a NaN loss) or its encoder output inf (which the codebook
    # step, k-means init and code replacement would write into the codebook): the run stops with
    # every weight and buffer as it was when the bad numbers appeared
    models: list[VQVAE] = []

    class Poisoned(VQVAE):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.calls, self.snapshot = 0, None
            models.append(self)

        def poison(self, out: torch.Tensor, value: float) -> torch.Tensor:
            self.calls += 1
            if self.calls != 3:
                return out
            self.snapshot = {k: v.detach().clone() for k, v in self.state_dict().items()}
            return out * 0 + value

        def encode_features(self, images: torch.Tensor) -> torch.Tensor:
            out = super().encode_features(images)
            return self.poison(out, math.inf) if where == "encoder" else out

        def decode_features(self, z_q: torch.Tensor) -> torch.Tensor:
            out = super().decode_features(z_q)
            return self.poison(out, math.nan) if where == "decoder" else out

    monkeypatch.setattr("training.loop.VQVAE", Poisoned)
    config = tiny(tmp_path / "run", bank_cache, f"mode={mode}", "steps=10", "image_every=0")
    with pytest.raises(FloatingPointError, match=r"is (nan|not finite) at step 3; lower optim\.lr"):
        train(config, progress=False)
    (model,) = models
    assert model.snapshot is not None
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, model.snapshot[k])]
    assert changed == []


def test_bf16_autocast_runs_on_cpu_and_learns(tmp_path: Path, bank_cache: Path) -> None:
    config = tiny(tmp_path / "run", bank_cache, "amp=bf16", "steps=30", "log_every=5")
    parts = build_parts(config, torch.device("cpu"))
    x = torch.rand(2, 3, 16, 16)
    with parts.autocast():
        z = parts.encode(x)
        _, info = parts.model.quantizer(z)
    assert z.dtype == torch.bfloat16  # the convs run in bf16: the path is really on
    assert info["loss"].dtype == torch.float32  # the nearest-code search stays fp32
    summary = train(config, progress=False)
    recon = [row["recon"] for row in read_metrics(tmp_path / "run")]
    assert summary["stopped"] == "completed" and recon[-1] < recon[0]


def test_channels_last_trains_the_same_model(tmp_path: Path, bank_cache: Path) -> None:
    x = torch.rand(16, 3, 16, 16)
    steps = {}
    for layout in (False, True):
        config = tiny(tmp_path, bank_cache, f"channels_last={layout}")
        parts = build_parts(config, torch.device("cpu"))
        batch = x.to(memory_format=parts.memory_format)
        steps[layout] = (parts, [train_step(parts, batch, config, step) for step in (1, 2)])
    (plain, plain_out), (nhwc, nhwc_out) = steps[False], steps[True]
    conv = next(m for m in nhwc.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert nhwc.memory_format == torch.channels_last
    for a, b in zip(plain_out, nhwc_out):  # same math in a new layout: same losses, same tokens
        torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-6)
        assert torch.equal(a.info["indices"], b.info["indices"])
    # Adam's first steps move each weight by ~lr whatever the gradient's size, so summation-order
    # noise in a near-zero gradient can show up at a fraction of lr; a layout bug (a permuted
    # weight) would show up at the weights' own scale (~0.1)
    tolerance = sum(out.lr for out in plain_out) / 2
    for (name, a), b in zip(plain.model.state_dict().items(), nhwc.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=tolerance, msg=name)
