"""benchmarks/tokenize_throughput.py --quick runs (single vs ray, equal token files) and ends
with one JSON line; the figures themselves come from its full run (docs/tokenizing.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'vqtok[tokenize]')")
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_tokenize_throughput_quick_mode_runs() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.tokenize_throughput", "--quick"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert record["tokens_equal"] is True and record["images"] == 6
    assert record["single"]["images_per_s_median"] > 0 and record["ray"]["images_per_s_median"] > 0
