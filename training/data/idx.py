"""Fashion-MNIST from the Debian package `dataset-fashion-mnist`, and the IDX format it uses.

IDX layout (big-endian): two zero bytes, one type byte, one byte n_dims, n_dims uint32 sizes, then
the values in C order. Files may be gzip-compressed; the gzip magic decides, not the file name.
"""

from __future__ import annotations

import functools
import gzip
import math
import os
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np

from training.data.image_source import ImageItem, ImageSource, MissingSourceError, file_key

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {"train": "train-images-idx3-ubyte.gz", "test": "t10k-images-idx3-ubyte.gz"}

_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _open_idx(path: str | os.PathLike[str]) -> BinaryIO:
    with open(path, "rb") as raw:
        gzipped = raw.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gzipped else open(path, "rb")


def _read_header(
    stream: BinaryIO, path: str | os.PathLike[str]
) -> tuple[np.dtype, tuple[int, ...]]:
    magic = stream.read(4)
    if len(magic) < 4 or magic[:2] != b"\0\0" or magic[2] not in _IDX_DTYPES:
        raise ValueError(
            f"{path} is not an IDX file: starts with {magic.hex()!r}, expected 0000 then a type "
            f"byte in {[f'{code:02x}' for code in _IDX_DTYPES]} and a dimension count"
        )
    n_dims = magic[3]
    dims = stream.read(4 * n_dims)
    if len(dims) < 4 * n_dims:
        raise ValueError(f"{path}: IDX header truncated ({n_dims} dimensions announced)")
    return np.dtype(_IDX_DTYPES[magic[2]]), struct.unpack(f">{n_dims}I", dims)


def read_idx_header(path: str | os.PathLike[str]) -> tuple[np.dtype, tuple[int, ...]]:
    """(dtype, shape) of an IDX file, reading only its header."""
    with _open_idx(path) as stream:
        return _read_header(stream, path)


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """The array stored in an IDX file (optionally gzipped), in native byte order."""
    with _open_idx(path) as stream:
        dtype, shape = _read_header(stream, path)
        data = stream.read()
    expected = math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(
            f"{path}: IDX header announces shape {shape} ({expected} bytes of {dtype}) "
            f"but {len(data)} bytes follow"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


class _IdxImages:
    """Decompresses the IDX file on first use, so listing a cached source stays cheap."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @functools.cached_property
    def pixels(self) -> np.ndarray:
        return read_idx(self.path)

    def rgb(self, index: int) -> np.ndarray:
        return np.repeat(self.pixels[index][..., None], 3, axis=2)


def fashion_mnist(split: str = "train", *, root: Path = FASHION_MNIST_DIR) -> ImageSource:
    """Fashion-MNIST images of one split ("train": 60k, "test": 10k) as 28x28x3 uint8 RGB."""
    if split not in FASHION_MNIST_FILES:
        raise ValueError(
            f"Fashion-MNIST split must be one of {list(FASHION_MNIST_FILES)}, got {split!r}"
        )
    path = root / FASHION_MNIST_FILES[split]
    if not path.is_file():
        raise MissingSourceError(
            f"Fashion-MNIST {split} images not found at {path}; "
            "install with: sudo apt-get install dataset-fashion-mnist"
        )
    dtype, shape = read_idx_header(path)
    if len(shape) != 3 or dtype != np.uint8:
        raise ValueError(f"{path}: expected uint8 images [N, H, W], found {dtype} {shape}")
    images = _IdxImages(path)
    key = file_key(path)
    items = tuple(
        ImageItem(
            name=f"{split}/{index}", key=f"{key}#{index}", load=functools.partial(images.rgb, index)
        )
        for index in range(shape[0])
    )
    spec = "fashion-mnist" if split == "train" else f"fashion-mnist:{split}"
    return ImageSource(spec=spec, items=items)
