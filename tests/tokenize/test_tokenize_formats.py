"""vqtok-tokenize in one process: every input kind gives the folder's tokens, Parquet output
holds the .npz output's tokens, parts add up to the whole, and an interrupted run resumes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tokenize_support import MODEL_DIR, manifests, read_tokens, stems, unreadable

from service.engine import Engine
from service.images import unit_pixels
from service.tokenize import main, tokenize
from service.tokenize_inputs import resolve_inputs
from service.tokenize_run import TokenizeOptions

PAD = ["--resize", "pad", "--shard-size", "4", "--batch-size", "3", "--quiet"]


def _run(inputs: list[str], out: Path, *flags: str) -> dict:
    assert main([*inputs, "--out", str(out), "--model-dir", str(MODEL_DIR), *PAD, *flags]) == 0
    (manifest,) = manifests(out)
    return manifest


@pytest.fixture(scope="module")
def folder_tokens(inputs, tmp_path_factory) -> dict[str, np.ndarray]:
    out = tmp_path_factory.mktemp("folder-tokens")
    manifest = _run([str(inputs.folder)], out)
    assert unreadable(out) == {"zz/not-an-image.jpg", "zz/cut.png"}
    assert manifest["images"] == len(inputs.images)
    return stems(read_tokens(out))


def test_the_folder_gives_the_engines_tokens(inputs, engine: Engine, folder_tokens) -> None:
    from PIL import Image

    assert folder_tokens.keys() == inputs.images.keys()
    for key, (extension, _) in inputs.images.items():
        with Image.open(inputs.folder / f"{key}.{extension}") as image:
            rgb = np.asarray(image.convert("RGB"))
        # resize=pad by hand: edge-pad bottom/right to multiples of f = 8, then [0, 1] floats
        padded = np.pad(rgb, ((0, -rgb.shape[0] % 8), (0, -rgb.shape[1] % 8), (0, 0)), "edge")
        expected = engine.encode(unit_pixels(padded)[None])[0]
        np.testing.assert_array_equal(folder_tokens[key], expected, err_msg=key)
        assert len(np.unique(expected)) > 5  # real tokens, not a constant


@pytest.mark.parametrize("kind", ["webdataset", "parquet"])
def test_tars_and_parquet_give_the_folders_tokens(
    inputs, tmp_path: Path, folder_tokens, kind: str
) -> None:
    paths = [inputs.tar_pattern] if kind == "webdataset" else inputs.parquets
    manifest = _run(paths, tmp_path / "out")
    grids = read_tokens(tmp_path / "out")
    extra = {"cut/ok": folder_tokens["a/000"]} if kind == "webdataset" else {}
    assert grids.keys() == folder_tokens.keys() | extra.keys()
    for key, grid in grids.items():
        np.testing.assert_array_equal(grid, {**folder_tokens, **extra}[key], err_msg=key)
    bad = {item["name"]: item["error"] for item in manifest["unreadable"]}
    if kind == "webdataset":
        # Python's tarfile may also refuse the cut archive as a whole after its first member
        assert bad.keys() - {"wds-00002.tar"} == {"zz/garbage", "cut/lost"}
        assert "cut short" in bad["cut/lost"] and "not an image" in bad["zz/garbage"]
    else:
        assert bad.keys() == {"zz/garbage", "zz/no-bytes", "p-00002.parquet"}
        assert "not a readable Parquet file" in bad["p-00002.parquet"]
        assert manifest["unreadable_inputs"] == [
            {"name": "p-00002.parquet", "error": bad["p-00002.parquet"]}
        ]


def test_parquet_output_holds_the_npz_tokens(inputs, tmp_path: Path, folder_tokens) -> None:
    import pyarrow.parquet as pq

    manifest = _run([inputs.tar_pattern], tmp_path / "pq", "--output-format", "parquet")
    assert manifest["token_dtype"] == "int16" and manifest["output_format"] == "parquet"
    grids = read_tokens(tmp_path / "pq")
    for key, grid in grids.items():
        np.testing.assert_array_equal(grid, folder_tokens.get(key, folder_tokens["a/000"]))
    table = pq.read_table(tmp_path / "pq" / manifest["shards"][0]["file"])
    assert table.schema.field("tokens").type.value_type.bit_width == 16
    row = table.slice(0, 1).to_pylist()[0]
    key = row["key"]
    assert row["model_id"] == manifest["model"]["id"]
    extension, _ = inputs.images[key]
    from PIL import Image

    with Image.open(inputs.folder / f"{key}.{extension}") as image:
        assert row["original_size"] == [image.height, image.width]
    assert row["token_shape"] == [-(-image.height // 8), -(-image.width // 8)]
    assert len(row["tokens"]) == row["token_shape"][0] * row["token_shape"][1]


@pytest.mark.parametrize("output_format", ["npz", "parquet"])
def test_parts_together_are_the_whole(inputs, tmp_path: Path, output_format: str) -> None:
    paths = inputs.parquets
    whole = tmp_path / "whole"
    _run(paths, whole, "--output-format", output_format)
    parts = tmp_path / "parts"
    for index in range(3):
        flags = ["--num-shards", "3", "--shard-index", str(index), "--output-format", output_format]
        assert main([*paths, "--out", str(parts), "--model-dir", str(MODEL_DIR), *PAD, *flags]) == 0
    assert sorted(p.name for p in parts.iterdir()) == [f"part-0000{i}-of-00003" for i in range(3)]
    expected, got = read_tokens(whole), read_tokens(parts)  # read_tokens: no key twice
    assert got.keys() == expected.keys()
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])
    assert unreadable(parts) == unreadable(whole)
    assert sum(m["images"] for m in manifests(parts)) == len(expected)


class _FailingEngine:
    """The real engine until ``calls`` encode calls have run, then a crash (a killed job)."""

    def __init__(self, engine: Engine, calls: int) -> None:
        self.engine, self.calls, self.info = engine, calls, engine.info

    def encode(self, images: np.ndarray) -> np.ndarray:
        self.calls -= 1
        if self.calls < 0:
            raise KeyboardInterrupt("stopped")
        return self.engine.encode(images)


def test_an_interrupted_run_resumes(inputs, engine: Engine, tmp_path: Path) -> None:
    spec = resolve_inputs([inputs.tar_pattern])
    options = TokenizeOptions(resize="pad", shard_size=3, batch_size=3, show_progress=False)
    fresh = tokenize(spec, tmp_path / "fresh", engine, options)

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        tokenize(spec, out, _FailingEngine(engine, calls=4), options)  # type: ignore[arg-type]
    stopped = json.loads((out / "manifest.json").read_text())
    assert not stopped["complete"] and 0 < len(stopped["shards"]) < len(fresh["shards"])
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    # a half-written shard never appears under its name (atomic writes), but a damaged one is
    # redone: cut the first finished shard in half
    first = out / stopped["shards"][0]["file"]
    first.write_bytes(first.read_bytes()[:100])

    resumed = tokenize(spec, out, engine, options)
    assert resumed["complete"] and resumed["skipped_shards"] == len(stamps) - 1
    for name, stamp in stamps.items():
        if name != first.name:  # finished shards were not redone
            assert (out / name).stat().st_mtime_ns == stamp
    assert resumed["shards"] == fresh["shards"]
    for name in (record["file"] for record in fresh["shards"]):
        assert (out / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes()
