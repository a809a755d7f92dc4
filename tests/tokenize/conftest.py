"""Fixtures of the tokenize tests: one photo set written as every input kind, and the engine
of models/default (the shipped model)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from tokenize_support import MODEL_DIR, photo_set, write_folder, write_parquets, write_tars

from service.engine import Engine


@dataclass(frozen=True)
class Inputs:
    images: dict[str, tuple[str, bytes]]  # key -> (extension, bytes)
    folder: Path
    tar_pattern: str
    parquets: list[str]


@pytest.fixture(scope="session")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    root = tmp_path_factory.mktemp("tokenize-inputs")
    images = photo_set()
    return Inputs(
        images=images,
        folder=write_folder(root / "folder", images),
        tar_pattern=write_tars(root / "tars", images),
        parquets=write_parquets(root / "parquet", images),
    )


@pytest.fixture(scope="session")
def engine() -> Engine:
    return Engine(MODEL_DIR, providers="cpu", intra_op_threads=2)
