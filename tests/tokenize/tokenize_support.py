"""The same small photo set as a folder, WebDataset tars and Parquet files (with damaged
inputs in each), and readers of what `vqtok-tokenize` writes."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from service.tokenize_outputs import read_parquet_tokens

MODEL_DIR = Path(__file__).resolve().parents[2] / "models" / "default"
EXTENSIONS = ("png", "jpg", "webp")


def photo_set(count: int = 10) -> dict[str, tuple[str, bytes]]:
    """{key: (extension, encoded bytes)}: crops of scikit-image's bundled photos, 40-120 px,
    in PNG / JPEG / WebP, under two folders."""
    from skimage import data

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    rng = np.random.default_rng(16)
    images = {}
    for index in range(count):
        photo = photos[index % len(photos)]
        height, width = (int(v) for v in rng.integers(40, 121, size=2))
        top = int(rng.integers(0, photo.shape[0] - height))
        left = int(rng.integers(0, photo.shape[1] - width))
        crop = Image.fromarray(photo[top : top + height, left : left + width])
        extension = EXTENSIONS[index % len(EXTENSIONS)]
        buffer = io.BytesIO()
        crop.save(buffer, format={"jpg": "JPEG"}.get(extension, extension.upper()))
        images[f"{'ab'[index % 2]}/{index:03d}"] = (extension, buffer.getvalue())
    return images


def cut_png(images: dict[str, tuple[str, bytes]]) -> bytes:
    png = next(data for extension, data in images.values() if extension == "png")
    return png[: len(png) // 2]


def write_folder(root: Path, images: dict[str, tuple[str, bytes]]) -> Path:
    for key, (extension, data) in images.items():
        path = root / f"{key}.{extension}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (root / "zz").mkdir(parents=True, exist_ok=True)
    (root / "zz" / "not-an-image.jpg").write_text("a text file named like a photo")
    (root / "zz" / "cut.png").write_bytes(cut_png(images))
    (root / "notes.txt").write_text("not an image suffix: not listed")
    return root


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def write_tars(folder: Path, images: dict[str, tuple[str, bytes]]) -> str:
    """wds-00000.tar and wds-00001.tar share the photos (each sample with a .json member);
    wds-00000 also holds a garbage .jpg member; wds-00002.tar ends inside its second image.
    Returns the brace pattern of all three."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(images)
    halves = (keys[: len(keys) // 2], keys[len(keys) // 2 :])
    for index, half in enumerate(halves):
        with tarfile.open(folder / f"wds-{index:05d}.tar", "w") as archive:
            for key in half:
                extension, data = images[key]
                _add(archive, f"{key}.{extension}", data)
                _add(archive, f"{key}.json", json.dumps({"key": key}).encode())
            if index == 0:
                _add(archive, "zz/garbage.jpg", b"\x00garbage, not a jpeg" * 10)
    extension, data = images[keys[0]]
    cut = io.BytesIO()
    with tarfile.open(fileobj=cut, mode="w") as archive:
        _add(archive, f"cut/ok.{extension}", data)
        _add(archive, f"cut/lost.{extension}", data)
    with tarfile.open(fileobj=io.BytesIO(cut.getvalue())) as archive:
        lost = archive.getmembers()[1]
    end = lost.offset_data + lost.size // 2  # inside the second image's data
    (folder / "wds-00002.tar").write_bytes(cut.getvalue()[:end])
    return str(folder / "wds-{00000..00002}.tar")


def write_parquets(folder: Path, images: dict[str, tuple[str, bytes]]) -> list[str]:
    """p-00000.parquet: binary ``jpg`` column + ``key``, row groups of 2, one garbage row;
    p-00001.parquet: HuggingFace's ``image`` struct {bytes, path} + ``key``, one row without
    bytes; p-00002.parquet: cut in half (unreadable footer)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(images)
    first, second = keys[: len(keys) // 2], keys[len(keys) // 2 :]
    table = pa.table(
        {
            "key": [*first, "zz/garbage"],
            "jpg": [*(images[k][1] for k in first), b"garbage"],
        }
    )
    pq.write_table(table, folder / "p-00000.parquet", row_group_size=2)
    structs = [{"bytes": images[k][1], "path": f"{k}.{images[k][0]}"} for k in second]
    structs.append({"bytes": None, "path": "elsewhere.jpg"})
    table = pa.table({"image": structs, "key": [*second, "zz/no-bytes"]})
    pq.write_table(table, folder / "p-00001.parquet", row_group_size=3)
    data = (folder / "p-00000.parquet").read_bytes()
    (folder / "p-00002.parquet").write_bytes(data[: len(data) // 2])
    return [str(folder / f"p-{i:05d}.parquet") for i in range(3)]


def manifests(out: Path) -> list[dict]:
    """The manifest of ``out``, or of each part folder in it."""
    paths = [out / "manifest.json"] if (out / "manifest.json").exists() else []
    paths += sorted(out.glob("part-*/manifest.json"))
    return [json.loads(path.read_text()) for path in paths]


def read_tokens(out: Path) -> dict[str, np.ndarray]:
    """{key: int64 [h, w]} of every shard under ``out`` (every part); keys must not repeat."""
    grids: dict[str, np.ndarray] = {}
    for shard in sorted([*out.glob("shard-*"), *out.glob("part-*/shard-*")]):
        found = _npz_tokens(shard) if shard.suffix == ".npz" else read_parquet_tokens(shard)
        assert not set(found) & set(grids), f"{shard}: keys seen twice"
        grids |= {key: grid.astype(np.int64) for key, grid in found.items()}
    return grids


def _npz_tokens(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as shard:
        names, shapes, tokens = shard["names"].tolist(), shard["token_shapes"], shard["tokens"]
        if tokens.ndim == 3:
            return dict(zip(names, tokens))
        offsets = shard["offsets"]
        return {
            name: tokens[offsets[i] : offsets[i + 1]].reshape(shapes[i])
            for i, name in enumerate(names)
        }


def unreadable(out: Path) -> set[str]:
    return {bad["name"] for manifest in manifests(out) for bad in manifest["unreadable"]}


def stems(grids: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Folder keys without their extension, to compare with WebDataset / Parquet keys."""
    return {key.rsplit(".", 1)[0]: grid for key, grid in grids.items()}
