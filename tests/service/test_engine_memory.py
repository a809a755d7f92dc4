"""The engine hands back the working memory of images above the native size (onnxruntime's arena
would otherwise keep the largest working set it ever needed, for good)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROBE = """
import json, os, sys
import numpy as np
from service.engine import Engine

def rss():
    for line in open(f"/proc/{os.getpid()}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

engine = Engine("models/default", providers="cpu", intra_op_threads=1)
before = rss()
engine.decode(engine.encode(np.full((1, 3, 1024, 768), 0.5, np.float32)))
print(json.dumps({"grown_mib": rss() - before}))
"""


def test_a_large_image_leaves_no_arena_behind() -> None:
    # 1024 x 768 needs ~0.5 GiB of encoder and ~0.5 GiB of decoder working memory; without
    # arena shrinkage the process stayed ~0.8 GiB larger after it
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    grown = json.loads(out.strip().splitlines()[-1])["grown_mib"]
    assert grown < 200, f"RSS grew {grown:.0f} MiB after one 1024x768 encode + decode"
