"""vqtok-train's command line: bad configs exit 2 before any work, a good one trains and prints
its summary as one JSON line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from training.cli import main

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "training" / "configs" / "tiny.yaml"


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("model.downsample=6", "model.downsample"),
        ("model.image_size=30", "model.image_size"),
        ("data.patch_size=10", "data.patch_size"),
        ("optim.lr=fast", "optim.lr"),
        ("optim.warmup=5", "optim.warmup"),
        ("model.quantizer.residual_stages=2", "model.quantizer.residual_stages"),
    ],
)
def test_bad_config_exits_2_naming_the_key_before_any_work(
    override: str, key: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "run"
    assert main(["--config", str(TINY), f"out_dir={out_dir}", override]) == 2
    err = capsys.readouterr().err
    assert f"{key}: " in err and err.startswith("vqtok-train: ")
    assert not out_dir.exists()


def test_missing_config_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_trains_and_prints_a_json_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "run"
    overrides = [f"out_dir={out_dir}", f"data.cache_dir={tmp_path}", "data.bank_size=64", "steps=2"]
    assert main(["--config", str(TINY), "--no-progress", *overrides]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["run_dir"] == str(out_dir) and summary["step"] == 2
    assert Path(summary["last_checkpoint"], "weights.safetensors").is_file()
    # a second start without --resume refuses to mix two runs in one directory
    assert main(["--config", str(TINY), "--no-progress", *overrides]) == 2
    assert "--resume" in capsys.readouterr().err


def test_module_entry_point_shows_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "training.cli", "--help"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0
    assert "--resume" in result.stdout and "key=value" in result.stdout


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("debian-photos", "not installed; install with: sudo apt-get install lomiri-wallpapers"),
        ("folder:{tmp}/none", "image folder {tmp}/none does not exist"),
        ("flickr", "unknown image source 'flickr'; valid sources: folder:<path>, pip-photos"),
    ],
)
def test_missing_or_unknown_data_source_exits_2_in_one_line(
    source: str,
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # as on a machine without the Debian photo packages: dpkg lists none of their files
    monkeypatch.setattr("training.data.photos._package_photos", lambda package, info_dir: [])
    spec = source.format(tmp=tmp_path)
    overrides = [f"out_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path}", f"data.source={spec}"]
    assert main(["--config", str(TINY), "--no-progress", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"vqtok-train: data.source={spec!r}: ") and err.count("\n") == 1, err
    assert message.format(tmp=tmp_path) in err


def test_diverged_run_ends_in_one_line_with_status_1(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def diverge(*args: object, **kwargs: object) -> None:
        raise FloatingPointError("loss is nan at step 7; lower optim.lr")

    monkeypatch.setattr("training.loop.train", diverge)
    assert main(["--config", str(TINY)]) == 1
    assert capsys.readouterr().err == "vqtok-train: loss is nan at step 7; lower optim.lr\n"


def test_device_cuda_without_cuda_is_one_line_and_exit_2(tmp_path, capsys) -> None:
    import torch

    from training.cli import main

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code = main(["--config", "training/configs/tiny.yaml", "device=cuda", f"out_dir={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "device: cuda was requested" in err[0]
