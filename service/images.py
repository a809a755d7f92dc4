"""Uploads in, model input out; model output in, PNG out.

`decode_upload` is the service's image policy, in this order:
1. identify the format and read the size from the header only (Pillow's `Image.open` is lazy),
2. refuse more than `max_pixels` BEFORE any pixel is decoded (decompression bombs: 413, fast),
3. decode, apply the EXIF orientation, flatten alpha onto white, convert to RGB,
4. apply the resize policy: `fit` (shorter side → the model's native size, centre crop),
   `pad` (keep the size, edge-pad right/bottom to a multiple of f) or `none` (must already be one),
5. float32 [3, H, W] in [0, 1].
Everything here is CPU-bound: routes call it through the thread pool, never on the event loop.
"""

from __future__ import annotations

import io
import math
import re
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.errors import Problem

ResizePolicy = Literal["fit", "pad", "none"]


@dataclass(frozen=True)
class PreparedImage:
    """One upload ready for the encoder."""

    pixels: np.ndarray  # float32 [3, H, W] in [0, 1]
    original_size: tuple[int, int]  # (H0, W0) after EXIF orientation, before the resize policy

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.pixels.shape[1]), int(self.pixels.shape[2])


def decode_upload(
    data: bytes,
    *,
    policy: ResizePolicy,
    native_size: int,
    downsample: int,
    max_pixels: int,
    field: str = "images",
) -> PreparedImage:
    """Decode one uploaded file under the service's image policy (module docstring)."""
    image = _open_checked(data, max_pixels=max_pixels, field=field)
    rgb = _to_rgb(image, field=field)
    original_size = (rgb.height, rgb.width)
    if policy == "fit":
        array = _fit(rgb, native_size)
    elif policy == "pad":
        array = _pad(np.asarray(rgb), downsample)
    else:
        if rgb.height % downsample or rgb.width % downsample:
            raise Problem(
                422,
                "size-not-multiple",
                f"{field}: resize=none needs both sides to be multiples of {downsample}, got "
                f"{rgb.height}x{rgb.width} (H x W); use resize=pad or resize=fit",
                field=field,
                limit=f"multiple of {downsample}",
                value=[rgb.height, rgb.width],
            )
        array = np.asarray(rgb)
    pixels = np.ascontiguousarray(array.transpose(2, 0, 1), dtype=np.float32)
    pixels *= np.float32(1.0 / 255.0)
    return PreparedImage(pixels=pixels, original_size=original_size)


_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


def _open_checked(data: bytes, *, max_pixels: int, field: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Our own limit below replaces Pillow's warning threshold.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        # Pillow refuses > 2x its own limit while opening; still a 413 with the numbers.
        match = _BOMB_PIXELS.search(str(error))
        value = int(match.group(1)) if match else None
        raise _too_many_pixels(field, max_pixels, value, None) from error
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise Problem(
            415,
            "not-an-image",
            f"{field}: not an image format this service reads "
            f"(PNG, JPEG, WebP, GIF, BMP, TIFF, ...; got {_describe(data)})",
            field=field,
        ) from error
    width, height = image.size
    if width * height > max_pixels:
        raise _too_many_pixels(field, max_pixels, width * height, (height, width))
    if width < 1 or height < 1:
        raise Problem(422, "empty-image", f"{field}: image has no pixels", field=field)
    return image


def _too_many_pixels(
    field: str, limit: int, value: int | None, size: tuple[int, int] | None
) -> Problem:
    dims = f" ({size[0]}x{size[1]}, H x W)" if size else ""
    shown = f"{value} pixels{dims}" if value is not None else "more pixels"
    return Problem(
        413,
        "too-many-pixels",
        f"{field}: image header declares {shown}; the limit is {limit} pixels per image",
        field=field,
        limit=limit,
        value=value,
    )


def _to_rgb(image: Image.Image, *, field: str) -> Image.Image:
    try:
        image.load()
        image = ImageOps.exif_transpose(image) or image
        if image.mode in ("RGBA", "LA", "PA") or (
            image.mode == "P" and "transparency" in image.info
        ):
            # Transparent pixels have arbitrary colour underneath: show them on white.
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, rgba)
        elif image.mode in ("I;16", "I;16B", "I;16L", "I"):
            # 16-bit greyscale: scale to 8 bits instead of clipping at 255.
            wide = np.asarray(image, dtype=np.float64)
            image = Image.fromarray(np.clip(wide / 257.0, 0, 255).astype(np.uint8))
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as error:
        raise Problem(
            400,
            "corrupt-image",
            f"{field}: the {image.format or 'image'} data is truncated or corrupt ({error})",
            field=field,
        ) from error


def _fit(image: Image.Image, size: int) -> np.ndarray:
    scale = size / min(image.width, image.height)
    width = max(size, math.ceil(image.width * scale - 1e-6))
    height = max(size, math.ceil(image.height * scale - 1e-6))
    if (width, height) != image.size:
        image = image.resize((width, height), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (width - size) // 2, (height - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)))


def _pad(array: np.ndarray, multiple: int) -> np.ndarray:
    height, width = array.shape[:2]
    pad_h, pad_w = -height % multiple, -width % multiple
    if pad_h == 0 and pad_w == 0:
        return array
    # Edge padding reconstructs better than black bars; the caller crops it away after decode.
    return np.pad(array, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")


def _describe(data: bytes) -> str:
    if not data:
        return "an empty file"
    return f"{len(data)} bytes starting {data[:8]!r}"


def encode_png(pixels: np.ndarray, *, crop_to: tuple[int, int] | None = None) -> bytes:
    """float32 [3, H, W] in [0, 1] → PNG bytes, optionally cropped to the top-left (H0, W0)."""
    if crop_to is not None:
        pixels = pixels[:, : crop_to[0], : crop_to[1]]
    rgb = np.clip(pixels.transpose(1, 2, 0) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    # Level 1: a few percent larger than 6 and several times faster; PNG stays lossless.
    Image.fromarray(rgb).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def psnr_db(reference: np.ndarray, reconstruction: np.ndarray) -> float:
    """PSNR in dB of two float arrays in [0, 1]; inf when identical."""
    mse = float(np.mean((reference.astype(np.float64) - reconstruction.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)
