"""Every benchmark's --quick mode runs, so none rots: exit 0 and a final JSON line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# MODEL: the small test model (tests/conftest.py tiny_model_dir) where a benchmark takes one
QUICK = {
    "abuse": ["memory", "--quick"],
    "checkpoint_average": ["--quick", "--data", "pip-photos", "MODEL", "MODEL"],
    "drain": ["--quick"],
    "engine": ["--quick", "--model-dir", "MODEL"],
    "quant_gap": ["--quick", "--checkpoint", "MODEL"],
    "service_load": ["--quick", "--model-dir", "MODEL"],
    "token_contract": ["--quick"],
    "train_step": ["--quick"],
    "vq_in_context": ["--quick"],
    "vq_layer": ["--quick"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(QUICK))
def test_benchmark_quick_mode_runs(name: str, tiny_model_dir: Path) -> None:
    flags = [str(tiny_model_dir) if flag == "MODEL" else flag for flag in QUICK[name]]
    done = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{name}", *flags],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    assert isinstance(json.loads(last), dict), last
