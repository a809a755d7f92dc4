"""vqtok-tokenize: shards, manifest, skip-on-rerun, unreadable files, pad layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from service_fakes import decode_upload

from service.engine import Engine
from service.tokenize import main, tokenize_folder


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Engine:
    return Engine(tiny_model_dir, providers="cpu", intra_op_threads=1)


def _save(photo: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((photo.transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(path)


@pytest.fixture
def image_dir(tmp_path: Path, photo_images: list) -> Path:
    root = tmp_path / "images"
    names = ["a.png", "b/c.jpg", "b/d.png", "e.webp"]
    for name, photo in zip(names, photo_images):
        _save(photo, root / name)
    (root / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "notes.txt").write_text("not an image, not listed")
    return root


def _expected_tokens(engine: Engine, path: Path, resize: str) -> np.ndarray:
    prepared = decode_upload(
        path.read_bytes(), policy=resize, native_size=64, downsample=8, max_pixels=10**8
    )
    return engine.encode(prepared.pixels[None])[0]


def test_shards_and_manifest(engine: Engine, image_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "tokens"
    args = [str(image_dir), "--out", str(out), "--model-dir", str(engine.model_dir)]
    assert main([*args, "--shard-size", "2", "--batch-size", "2", "--quiet"]) == 0
    assert "4 images -> 3 shards" in capsys.readouterr().out

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["id"] == engine.info.id
    assert (manifest["files"], manifest["images"], manifest["complete"]) == (5, 4, True)
    (bad,) = manifest["unreadable"]
    assert bad["name"] == "b/broken.jpg" and bad["error"]
    assert [s["file"] for s in manifest["shards"]] == [f"shard-0000{i}.npz" for i in range(3)]

    seen = []
    for record in manifest["shards"]:
        with np.load(out / record["file"]) as shard:
            assert shard["tokens"].dtype == np.uint16
            assert shard["tokens"].shape == (record["images"], 8, 8)  # fit: native 64 -> 8x8
            assert str(shard["model_id"]) == engine.info.id
            for name, grid, size in zip(shard["names"], shard["tokens"], shard["original_sizes"]):
                seen.append(str(name))
                np.testing.assert_array_equal(
                    grid, _expected_tokens(engine, image_dir / name, "fit")
                )
                with Image.open(image_dir / name) as image:
                    assert tuple(size) == (image.height, image.width)
    assert seen == ["a.png", "b/c.jpg", "b/d.png", "e.webp"]  # sorted paths, broken one left out


def test_rerun_skips_finished_shards(engine: Engine, image_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "tokens"
    tokenize_folder(image_dir, out, engine, shard_size=2, show_progress=False)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.npz")}

    again = tokenize_folder(image_dir, out, engine, shard_size=2, show_progress=False)
    assert again["skipped_shards"] == 3
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.npz")} == stamps
    assert [u["name"] for u in again["unreadable"]] == ["b/broken.jpg"]  # kept from the shard

    # a new file sorts last: only the last shard changes, a fourth is not needed (5 -> 6 files)
    Image.open(image_dir / "a.png").save(image_dir / "z.png")
    third = tokenize_folder(image_dir, out, engine, shard_size=2, show_progress=False)
    assert third["skipped_shards"] == 2 and third["images"] == 5
    now = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.npz")}
    assert now["shard-00000.npz"] == stamps["shard-00000.npz"]
    assert now["shard-00002.npz"] != stamps["shard-00002.npz"]


def test_pad_keeps_sizes_in_a_ragged_layout(
    engine: Engine, image_dir: Path, tmp_path: Path
) -> None:
    odd = np.random.default_rng(0).random((3, 50, 70), dtype=np.float32)
    _save(odd, image_dir / "odd.png")
    out = tmp_path / "padded"
    manifest = tokenize_folder(image_dir, out, engine, resize="pad", show_progress=False)
    assert manifest["layout"].startswith("ragged")
    with np.load(out / "shard-00000.npz") as shard:
        names = shard["names"].tolist()
        i = names.index("odd.png")
        assert tuple(shard["original_sizes"][i]) == (50, 70)
        assert tuple(shard["image_sizes"][i]) == (56, 72)
        assert tuple(shard["token_shapes"][i]) == (7, 9)
        start, stop = shard["offsets"][i], shard["offsets"][i + 1]
        grid = shard["tokens"][start:stop].reshape(7, 9)
        np.testing.assert_array_equal(grid, _expected_tokens(engine, image_dir / "odd.png", "pad"))


def test_refuses_to_mix_runs(engine: Engine, image_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "tokens"
    tokenize_folder(image_dir, out, engine, show_progress=False)
    args = [str(image_dir), "--out", str(out), "--model-dir", str(engine.model_dir), "--quiet"]
    assert main([*args, "--resize", "pad"]) == 1
    assert "resize=fit" in capsys.readouterr().err
    assert main([str(tmp_path / "nowhere"), *args[1:]]) == 1
    assert "is not a directory" in capsys.readouterr().err
