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
