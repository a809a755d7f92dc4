"""End-to-end fixtures: real `vqtok-serve` processes on free ports.

The model is the small exported model of the `tiny_model_dir` fixture (tests/conftest.py);
test_e2e_service.py checks models/default against its model card (PSNR within 0.5 dB, ~10 s).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_support import Server, start_server


@pytest.fixture(scope="session")
def e2e_model_dir(request: pytest.FixtureRequest) -> Path:
    # The small test model: models/default at native photo sizes takes minutes per pass on a
    # 2-core CI box; the card check against models/default is its own opt-in test.
    return Path(request.getfixturevalue("tiny_model_dir"))


@pytest.fixture(scope="session")
def server(e2e_model_dir: Path) -> Iterator[Server]:
    # max batch 8 (the CPU default is 4): a request of 8 images must reach the engine as one batch
    env = {"VQTOK_MAX_WAIT_MS": "5", "VQTOK_MAX_BODY_BYTES": str(8 << 20), "VQTOK_MAX_BATCH": "8"}
    running = start_server(e2e_model_dir, env=env)
    try:
        yield running
    finally:
        running.stop()
