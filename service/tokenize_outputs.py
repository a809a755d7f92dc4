"""What `vqtok-tokenize` writes: one output shard per run of items, as ``.npz`` or Parquet.

Both formats are self-describing (model id, the keys they hold, the keys they could not read),
so a re-run can tell a finished shard from a stale or partial one by reading the shard alone.

``.npz`` (``np.load(shard)``):
- ``tokens``: ``fit`` -> uint16 [n, h, w]; ``pad`` (sizes differ) -> uint16 [sum h*w], row-major
  per image, image ``i`` at ``offsets[i]:offsets[i+1]`` with shape ``token_shapes[i]``.
- ``names`` (str [n], the item keys), ``original_sizes`` / ``image_sizes`` / ``token_shapes``
  (int32 [n, 2], H x W), ``offsets`` (int64 [n+1]), ``unreadable_names`` /
  ``unreadable_errors`` (str), ``model_id`` (str scalar).

Parquet (``pyarrow.parquet.read_table(shard)``), one row per image: ``key`` (string),
``token_shape`` / ``original_size`` / ``image_size`` (list<int32> [H, W]), ``tokens``
(list<int16>, row-major; list<int32> when the codebook has more than 32768 codes), ``model_id``
(string). The unreadable keys and errors are in the file's key-value metadata
(``vqtok.unreadable``, JSON), with ``vqtok.model_id``.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

OutputFormat = Literal["npz", "parquet"]
OUTPUT_FORMATS: tuple[OutputFormat, ...] = ("npz", "parquet")
SUFFIXES = {"npz": ".npz", "parquet": ".parquet"}
INT16_CODES = 1 << 15  # list<int16> holds codes 0..32767


@dataclass
class EncodedShard:
    """One output shard's content, in item order: what either format writes."""

    model_id: str
    keys: list[str] = field(default_factory=list)
    grids: list[np.ndarray] = field(default_factory=list)  # integer [h, w] per key
    original_sizes: list[tuple[int, int]] = field(default_factory=list)
    image_sizes: list[tuple[int, int]] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (key, why)

    def add(
        self, key: str, grid: np.ndarray, original: tuple[int, int], image: tuple[int, int]
    ) -> None:
        self.keys.append(key)
        self.grids.append(grid)
        self.original_sizes.append(original)
        self.image_sizes.append(image)

    @property
    def tokens(self) -> int:
        return sum(int(grid.size) for grid in self.grids)


def shard_name(index: int, output_format: OutputFormat = "npz") -> str:
    return f"shard-{index:05d}{SUFFIXES[output_format]}"


def shard_bytes(
    shard: EncodedShard, output_format: OutputFormat, *, grid_layout: bool, codebook_size: int
) -> bytes:
    """The shard file's bytes (write them with ``service.files.write_bytes_atomic``)."""
    if output_format == "npz":
        return _npz_bytes(shard, grid_layout)
    return _parquet_bytes(shard, codebook_size)


def record(
    file: str, keys: list[str], unreadable: list[tuple[str, str]], tokens: int
) -> dict[str, Any]:
    """A shard's entry in manifest.json."""
    return {
        "file": file,
        "images": len(keys),
        "tokens": tokens,
        "unreadable": [{"name": n, "error": e} for n, e in unreadable],
    }


def finished(path: Path, model_id: str, keys: list[str]) -> dict[str, Any] | None:
    """The shard's record if ``path`` is complete for this model and exactly these keys."""
    try:
        if path.suffix == ".npz":
            done, bad, shard_model, tokens = _npz_contents(path)
        else:
            done, bad, shard_model, tokens = _parquet_contents(path)
    except Exception:  # missing, truncated, or not ours: redo it (pyarrow has its own errors)
        return None
    covered = [*done, *(name for name, _ in bad)]
    if shard_model != model_id or sorted(covered) != sorted(keys):
        return None
    return record(path.name, done, bad, tokens)


# -- .npz ------------------------------------------------------------------------------------------
def _npz_bytes(shard: EncodedShard, grid_layout: bool) -> bytes:
    grids = shard.grids
    shapes = np.array([g.shape for g in grids], np.int32).reshape(-1, 2)
    offsets = np.concatenate([[0], np.cumsum([g.size for g in grids])]).astype(np.int64)
    if grid_layout and grids:
        flat_or_grid = np.stack(grids)
    else:
        flat_or_grid = np.concatenate([g.ravel() for g in grids]) if grids else np.zeros(0)
    arrays = {
        "tokens": flat_or_grid.astype(np.uint16),
        "token_shapes": shapes,
        "offsets": offsets,
        "names": np.array(shard.keys, dtype=str),
        "original_sizes": np.array(shard.original_sizes, np.int32).reshape(-1, 2),
        "image_sizes": np.array(shard.image_sizes, np.int32).reshape(-1, 2),
        "unreadable_names": np.array([n for n, _ in shard.unreadable], dtype=str),
        "unreadable_errors": np.array([e for _, e in shard.unreadable], dtype=str),
        "model_id": np.array(shard.model_id),
    }
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _npz_contents(path: Path) -> tuple[list[str], list[tuple[str, str]], str, int]:
    with np.load(path, allow_pickle=False) as shard:
        bad = list(zip(shard["unreadable_names"].tolist(), shard["unreadable_errors"].tolist()))
        tokens = int(shard["token_shapes"].prod(axis=1).sum())
        return shard["names"].tolist(), bad, str(shard["model_id"]), tokens


# -- Parquet ---------------------------------------------------------------------------------------
def _parquet_bytes(shard: EncodedShard, codebook_size: int) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    token_type = pa.int16() if codebook_size <= INT16_CODES else pa.int32()
    sizes = pa.list_(pa.int32())
    numpy_type = np.int16 if codebook_size <= INT16_CODES else np.int32
    tokens = pa.array([g.ravel().astype(numpy_type) for g in shard.grids], pa.list_(token_type))
    columns = {
        "key": pa.array(shard.keys, pa.string()),
        "token_shape": pa.array([list(g.shape) for g in shard.grids], sizes),
        "tokens": tokens,
        "original_size": pa.array([list(s) for s in shard.original_sizes], sizes),
        "image_size": pa.array([list(s) for s in shard.image_sizes], sizes),
        "model_id": pa.array([shard.model_id] * len(shard.keys), pa.string()),
    }
    metadata = {
        "vqtok.model_id": shard.model_id,
        "vqtok.unreadable": json.dumps([[n, e] for n, e in shard.unreadable]),
    }
    table = pa.table(columns).replace_schema_metadata(metadata)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def _parquet_contents(path: Path) -> tuple[list[str], list[tuple[str, str]], str, int]:
    import pyarrow.parquet as pq

    file = pq.ParquetFile(path)
    metadata = file.schema_arrow.metadata or {}
    bad = [(n, e) for n, e in json.loads(metadata[b"vqtok.unreadable"])]
    columns = file.read(columns=["key", "token_shape"]).to_pydict()
    tokens = sum(h * w for h, w in columns["token_shape"])
    return columns["key"], bad, metadata[b"vqtok.model_id"].decode(), tokens


def read_parquet_tokens(path: str | Path) -> dict[str, np.ndarray]:
    """{key: int [h, w] tokens} of one Parquet shard (tests, examples)."""
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["key", "token_shape", "tokens"]).to_pydict()
    return {
        key: np.asarray(tokens).reshape(shape)
        for key, shape, tokens in zip(table["key"], table["token_shape"], table["tokens"])
    }
