"""What every image source hands to the patch bank: named, lazily loaded uint8 RGB images.

A source lists its images up front (cheap: paths and sizes) and decodes each one only when asked,
so a cached patch bank can be found without decoding anything.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps


class MissingSourceError(RuntimeError):
    """A data source is not installed here; the message names what to install."""


class UnusableSourceError(RuntimeError):
    """A source holds no image the patch bank can use (all unreadable or smaller than a patch)."""


class UnreadableImageError(OSError):
    """One image could not be decoded; sources skip it with an `UnreadableImageWarning`."""


class UnreadableImageWarning(UserWarning):
    """An image was skipped because it could not be decoded."""


@dataclass(frozen=True)
class ImageItem:
    """One image of a source.

    `key` changes whenever the pixels may have changed (path, size, mtime): it feeds the patch-bank
    cache name. `load()` returns uint8 [H, W, 3] RGB or raises `UnreadableImageError`.
    """

    name: str
    key: str
    load: Callable[[], np.ndarray]


@dataclass(frozen=True)
class ImageSource:
    """A named, ordered collection of images; `spec` is the string that recreates it."""

    spec: str
    items: tuple[ImageItem, ...]

    def __len__(self) -> int:
        return len(self.items)

    def fingerprint(self) -> str:
        """Hex digest of the spec and every item key: equal fingerprints mean equal pixels."""
        digest = hashlib.sha256(self.spec.encode())
        for item in self.items:
            digest.update(b"\0" + item.key.encode())
        return digest.hexdigest()

    def images(self) -> Iterator[tuple[str, np.ndarray]]:
        """Yield (name, uint8 [H, W, 3]) for every readable image, warning about the others."""
        for item in self.items:
            try:
                pixels = item.load()
            except UnreadableImageError as err:
                warnings.warn(f"skipping {err}", UnreadableImageWarning, stacklevel=2)
                continue
            yield item.name, pixels


def read_rgb(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode an image file to uint8 [H, W, 3] RGB, honouring EXIF orientation.

    Raises `UnreadableImageError` naming the file when Pillow cannot decode it.
    """
    try:
        with Image.open(path) as image:
            return _to_rgb(ImageOps.exif_transpose(image))
    # Pillow's format plugins signal broken files with many types (OSError, SyntaxError,
    # ValueError, struct.error, DecompressionBombError...), so anything raised here means
    # "this file is unreadable" rather than a bug in the caller.
    except Exception as err:
        raise UnreadableImageError(f"unreadable image {path}: {err}") from err


def _to_rgb(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: Pillow's convert("RGB") clips at 255 (a white image); keep the top byte.
        gray = (np.asarray(image).astype(np.int64).clip(0, 65535) >> 8).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if image.mode == "P":
        # Palette transparency only converts cleanly (without a Pillow warning) through RGBA.
        image = image.convert("RGBA")
    return np.asarray(image.convert("RGB"))


def file_key(path: Path, name: str | None = None) -> str:
    """Cache key for a file: its name plus size and mtime, so edits invalidate cached banks."""
    stat = path.stat()
    return f"{name if name is not None else path}:{stat.st_size}:{stat.st_mtime_ns}"


def file_item(path: Path, name: str | None = None) -> ImageItem:
    """An `ImageItem` that decodes `path` with `read_rgb` when loaded."""
    shown = name if name is not None else str(path)
    return ImageItem(name=shown, key=file_key(path, shown), load=lambda: read_rgb(path))
