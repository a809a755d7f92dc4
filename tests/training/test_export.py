"""training.export: parity with torch, the model directory, failures and re-runs, the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from service.engine import Engine
from training.export import (
    ExportError,
    ParityCase,
    compare_to_torch,
    export_model_dir,
    main,
    verification_photos,
    verification_sizes,
)
from vqmodel import VQVAE, ModelConfig, load_model, save_checkpoint


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Engine:
    return Engine(tiny_model_dir, providers="cpu", intra_op_threads=1)


@pytest.fixture(scope="module")
def photo_batches() -> dict:
    sizes = verification_sizes(64, 8)
    assert len(set(sizes)) == 3 and any(h != w for h, w in sizes)
    return verification_photos(sizes, 8)


def test_onnxruntime_reproduces_torch_exactly(
    tiny_model_dir: Path, engine: Engine, photo_batches: dict
) -> None:
    model, _ = load_model(tiny_model_dir)  # the model dir is also a checkpoint
    report = compare_to_torch(model, engine.encode, engine.decode, photo_batches)
    assert sorted((c.batch, c.height, c.width) for c in report.cases) == sorted(
        (b, h, w) for h, w in photo_batches for b in (1, 8)
    )
    assert report.tokens_total > 1000
    assert report.tokens_differing == 0, report.failures()
    assert report.max_image_diff <= 1e-4
    used = np.unique(engine.encode(photo_batches[(64, 96)]))
    assert used.size >= 16  # many codes in play, so equality is not trivially true


def test_model_directory_contents(tiny_model_dir: Path) -> None:
    manifest = json.loads((tiny_model_dir / "model.json").read_text())
    names = sorted(p.name for p in tiny_model_dir.iterdir())
    assert names == sorted(["model.json", "README.md", *manifest["files"]])
    assert (tiny_model_dir / "README.md").read_text().startswith(f"# {manifest['id']}")
    assert not any(name.endswith(".data") for name in names)  # single-file graphs
    assert {"encoder.onnx", "decoder.onnx", "weights.safetensors", "config.json"} <= set(names)
    assert manifest["id"].startswith("vqtok-f8-k64-") and len(manifest["id"]) == 25
    assert (manifest["image_size"], manifest["downsample"], manifest["codebook_size"]) == (
        64,
        8,
        64,
    )
    assert manifest["model_config"]["base_channels"] == 8
    assert manifest["training"]["steps"] == 0
    assert manifest["export"]["parity"]["tokens_differing"] == 0
    for file_name, axes in (("encoder.onnx", (0, 2, 3)), ("decoder.onnx", (0, 1, 2))):
        graph = onnx.load(str(tiny_model_dir / file_name)).graph
        dims = graph.input[0].type.tensor_type.shape.dim
        assert all(dims[axis].dim_param for axis in axes), f"{file_name} has fixed axes"


def test_mismatch_names_count_and_tie_status(
    tiny_model_dir: Path, engine: Engine, photo_batches: dict
) -> None:
    # swap two codes in torch only: every token on them flips, and they are far from ties
    model, _ = load_model(tiny_model_dir)
    onnx_tokens = engine.encode(photo_batches[(64, 64)])
    a, b = np.unique(onnx_tokens)[:2]
    with torch.no_grad():
        weight = model.quantizer.codebooks[0].weight
        weight[[a, b]] = weight[[b, a]].clone()
    report = compare_to_torch(
        model, engine.encode, engine.decode, {(64, 64): photo_batches[(64, 64)]}, batch_sizes=(8,)
    )
    expected = int(np.isin(onnx_tokens, [a, b]).sum())
    assert report.tokens_differing == expected > 0
    (message,) = [line for line in report.failures() if "tokens differ" in line]
    assert f"{expected} of {onnx_tokens.size} tokens differ" in message
    assert "NOT near-ties" in message


def test_near_ties_pass_up_to_one_per_ten_thousand_tokens() -> None:
    from training.export import ParityReport

    # 1 near-tie in 12288 tokens (what fp32 conv rounding did on a real export) passes ...
    tie = ParityCase(8, 256, 384, 12288, 1, 0.0, near_tie_gap=5.1e-7)
    clean = ParityCase(8, 256, 256, 8192, 0, 0.0)
    report = ParityReport([clean, tie])
    assert tie.passed and report.failures() == []
    assert report.summary()["near_tie_tokens"] == 1
    # ... a tie gap above NEAR_TIE is a real difference, whatever the count
    far = ParityCase(8, 256, 384, 12288, 1, 0.0, near_tie_gap=3e-3)
    assert not far.passed
    (message,) = ParityReport([clean, far]).failures()
    assert "1 of 12288 tokens differ, NOT near-ties" in message


def test_near_ties_above_the_rate_are_refused() -> None:
    from training.export import ParityReport

    # 2 near-ties in 96 tokens: each case alone is ties only, together far above 1 per 10^4
    report = ParityReport([ParityCase(1, 64, 96, 96, 2, 0.0, near_tie_gap=3e-7)])
    summary, case = report.failures()
    assert "2 of 96 tokens differ as near-ties" in summary and "more than the 0.0001" in summary
    assert "batch 1 at 64x96: 2 of 96 tokens differ, all near-ties" in case


# -- writing: atomic replacement, refusal, failure leaves the old directory ---------------------
@pytest.fixture
def fast_export(monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path) -> None:
    """Replace the (slow) dynamo export by copying the tiny model's graphs: the directory logic
    is what these tests exercise; the real exporter runs in the fixture and the CLI test."""

    def copy_graph(graph, example, path, input_name, output_name) -> None:
        name = "encoder.onnx" if example.dtype.is_floating_point else "decoder.onnx"
        shutil.copyfile(tiny_model_dir / name, path)

    monkeypatch.setattr("training.export.export_graph", copy_graph)


def test_rerun_replaces_the_directory(
    fast_export: None, tiny_model_dir: Path, tmp_path: Path, photo_batches: dict
) -> None:
    model, _ = load_model(tiny_model_dir)
    out = tmp_path / "models" / "m"
    batches = {(64, 96): photo_batches[(64, 96)]}
    first = export_model_dir(model, out, verify_batches=batches, progress=None)
    (out / "stale.txt").write_text("left over")
    second = export_model_dir(model, out, verify_batches=batches, progress=None)
    assert first.manifest["id"] == second.manifest["id"]  # same bytes, same id
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["m"]  # no temp dirs left behind


def test_failed_parity_leaves_old_directory(
    fast_export: None, tiny_model_dir: Path, tmp_path: Path, photo_batches: dict
) -> None:
    out = tmp_path / "m"
    shutil.copytree(tiny_model_dir, out)
    before = (out / "model.json").read_bytes()
    model, _ = load_model(tiny_model_dir)
    with torch.no_grad():  # torch now disagrees with the graphs the fake exporter copies
        model.quantizer.codebooks[0].weight.mul_(-1.0)
    with pytest.raises(ExportError, match=r"tokens differ") as caught:
        export_model_dir(model, out, verify_batches=photo_batches, progress=None)
    assert "batch 8 at 64x96" in str(caught.value)
    assert (out / "model.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_refuses_to_replace_a_foreign_directory(tiny_model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    model, _ = load_model(tiny_model_dir)
    with pytest.raises(ExportError, match=r"without model\.json; refusing"):
        export_model_dir(model, tmp_path, progress=None)
    assert (tmp_path / "notes.txt").read_text() == "mine"


# -- the CLI, end to end with the real exporter -------------------------------------------------
def test_cli_exports_checkpoint_with_card_and_triton(
    tiny_model_dir: Path, engine: Engine, tmp_path: Path, photo_images: list, capsys
) -> None:
    model, _ = load_model(tiny_model_dir)
    run = tmp_path / "run"  # a checkpoint inside a training run directory
    checkpoint = save_checkpoint(
        run / "checkpoints" / "step_0001234",
        model,
        metadata={"training": {"steps": 1234, "git_rev": "abc1234"}, "metrics": {"psnr": 21.5}},
    )
    (run / "config.yaml").write_text("data:\n  source: pip-photos\nsteps: 1234\n")
    card = tmp_path / "card.json"
    card.write_text(json.dumps({"description": "tiny test model", "license": "MIT"}))
    out, triton = tmp_path / "models" / "tiny", tmp_path / "triton"

    code = main([str(checkpoint), "--out", str(out), "--card", str(card), "--triton", str(triton)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "[3/4] verifying" in printed and "exported vqtok-f8-k64-" in printed

    manifest = json.loads((out / "model.json").read_text())
    assert manifest["training"]["steps"] == 1234 and manifest["training"]["git_rev"] == "abc1234"
    assert manifest["training"]["run_config"]["data"]["source"] == "pip-photos"
    assert manifest["export"]["command"].startswith("vqtok-export ")
    assert manifest["metrics"] == {"psnr": 21.5}
    assert manifest["description"] == "tiny test model" and manifest["license"] == "MIT"
    assert (triton / "vq_encoder" / "1" / "model.onnx").is_file()
    exported = Engine(out, providers="cpu", warmup=False)
    assert "source" not in exported.info.public
    for photo in photo_images:  # same weights, same tokens
        np.testing.assert_array_equal(exported.encode(photo[None]), engine.encode(photo[None]))


def test_cli_user_errors_are_one_line_and_exit_2(tmp_path: Path, capsys) -> None:
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    checkpoint = save_checkpoint(tmp_path / "ckpt", VQVAE(ModelConfig(base_channels=8)))
    (tmp_path / "card.json").write_text("[1, 2]")
    (tmp_path / "figures.json").write_text(json.dumps({"description": "f=8, 1024 codes"}))
    (tmp_path / "typed.json").write_text(json.dumps({"training": {"wall_time": "39 min"}}))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("mine")
    for argv, message in (
        ([tmp_path / "run"], "is a training run directory"),
        ([tmp_path / "missing"], "missing"),
        ([checkpoint, "--card", tmp_path / "card.json"], "expected a JSON object, got list"),
        ([checkpoint, "--card", tmp_path / "figures.json"], "description holds the digit(s) 01248"),
        ([checkpoint, "--card", tmp_path / "typed.json"], "unknown key(s) ['training']"),
        ([checkpoint, "--card", tmp_path / "nope.json"], "--card"),
        ([checkpoint, "--out", tmp_path / "notes"], "without model.json; refusing"),
    ):
        out = [] if "--out" in argv else ["--out", tmp_path / "m"]
        assert main([str(a) for a in [*argv, *out]]) == 2
        err = capsys.readouterr().err
        assert err.startswith("vqtok-export: error: ") and err.count("\n") == 1, err
        assert message in err
    assert not (tmp_path / "m").exists()
