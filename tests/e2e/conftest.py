"""End-to-end fixtures: real `vqtok-serve` processes on free ports.

The model is models/default when it has been committed (model.json present), else the small
exported model of the `tiny_model_dir` fixture (tests/conftest.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_support import DEFAULT_MODEL, Server, start_server


@pytest.fixture(scope="session")
def e2e_model_dir(request: pytest.FixtureRequest) -> Path:
    if (DEFAULT_MODEL / "model.json").is_file():
        return DEFAULT_MODEL
    return Path(request.getfixturevalue("tiny_model_dir"))


@pytest.fixture(scope="session")
def server(e2e_model_dir: Path) -> Iterator[Server]:
    running = start_server(
        e2e_model_dir, env={"VQTOK_MAX_WAIT_MS": "5", "VQTOK_MAX_BODY_BYTES": str(8 << 20)}
    )
    try:
        yield running
    finally:
        running.stop()
