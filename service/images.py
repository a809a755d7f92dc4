"""Uploads in, model input out; model output in, PNG out: the service's image policy.

`service.admission` opens each upload lazily (`open_image`: format and size from the header
only) and decides every limit before a pixel is decoded; then `decode_image`, one image at a
time:
1. decode, apply the EXIF orientation, flatten alpha onto white, convert to RGB,
2. apply the resize policy (`model_input_size` is its geometry): `fit` (shorter side → the
   model's native size, centre crop), `pad` (keep the size, edge-pad right/bottom to a multiple
   of f) or `none` (must already be one),
3. float32 [3, H, W] in [0, 1], made only after fit/pad, so a big upload never exists as floats.
Everything here is CPU-bound: the service calls it through the thread pool, never on the event
loop.
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

from service.problems import Problem

ResizePolicy = Literal["fit", "pad", "none"]
RESIZE_POLICIES: tuple[ResizePolicy, ...] = ("fit", "pad", "none")

# Pillow keeps 1, L and P rasters at one byte per pixel, I;16 at two, every other mode at four
# (RGB included); the decode path below holds at most one decoded raster, one converted RGBA/RGB
# copy and, for transparent images, a white background and the composite.
_ONE_BYTE_MODES = ("1", "L", "P")
_TWO_BYTE_MODES = ("I;16", "I;16B", "I;16L")


@dataclass(frozen=True)
class PreparedImage:
    """One upload ready for the encoder."""

    pixels: np.ndarray  # float32 [3, H, W] in [0, 1]
    original_size: tuple[int, int]  # (H0, W0) after EXIF orientation, before the resize policy

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.pixels.shape[1]), int(self.pixels.shape[2])


class TooManyPixels(ValueError):
    """Pillow refused the header itself (more than twice its own bomb limit)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        match = _BOMB_PIXELS.search(message)
        self.pixels = int(match.group(1)) if match else None


_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


def open_image(data: bytes, *, field: str) -> Image.Image:
    """The upload opened lazily: format, mode and size come from the header, no pixel decoded.

    Raises Problem 415 for data Pillow cannot identify, TooManyPixels for headers Pillow itself
    refuses as decompression bombs (the caller turns that into its pixel limit's 413).
    """
    try:
        with warnings.catch_warnings():
            # the admission's pixel limit replaces Pillow's warning threshold
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        raise TooManyPixels(str(error)) from error
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise Problem(
            415,
            "not-an-image",
            f"{field}: not an image format this service reads "
            f"(PNG, JPEG, WebP, GIF, BMP, TIFF, ...; got {_describe(data)})",
            field=field,
        ) from error


def decode_bytes_estimate(image: Image.Image, policy: ResizePolicy) -> int:
    """Upper estimate of the bytes `decode_image` holds at once for this (unopened) image."""
    width, height = image.size
    raster = 1 if image.mode in _ONE_BYTE_MODES else 2 if image.mode in _TWO_BYTE_MODES else 4
    transparent = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
    # decoded raster + one 4-byte copy (EXIF rotation or the RGB conversion) + background and
    # composite for transparency + the uint8 array and its padded copy for pad/none;
    # 16-bit greyscale is rescaled through a float64 copy
    arrays = 0 if policy == "fit" else 6  # fit hands on a native-size crop only
    per_pixel = raster + 4 + (8 if transparent else 0) + arrays + (8 if raster == 2 else 0)
    return per_pixel * width * height


def model_input_size(
    size: tuple[int, int], policy: ResizePolicy, native_size: int, downsample: int
) -> tuple[int, int] | None:
    """(H, W) the encoder sees for an upload of `size` (H0, W0); None when `none` cannot apply.

    EXIF rotation may swap H0 and W0 after decoding; every limit computed from this (pixels,
    token grid, bytes) is the same either way.
    """
    height, width = size
    if policy == "fit":
        return native_size, native_size
    if policy == "pad":
        return height + -height % downsample, width + -width % downsample
    if height % downsample or width % downsample:
        return None
    return height, width


def decode_image(
    image: Image.Image, *, policy: ResizePolicy, native_size: int, downsample: int, field: str
) -> PreparedImage:
    """Decode one admitted image under the service's image policy (module docstring).

    Consumes `image`: its decoded raster is released before returning, so a list of admitted
    images never holds more than one raster.
    """
    try:
        rgb = _to_rgb(image, field=field)
        if rgb is not image:
            image.close()  # the converted copy is all that is needed from here on
        try:
            original_size = (rgb.height, rgb.width)
            array = _apply_policy(rgb, policy, native_size, downsample, field)
        finally:
            rgb.close()
    finally:
        image.close()
    return PreparedImage(pixels=unit_pixels(array), original_size=original_size)


def unit_pixels(rgb: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [3, H, W] in [0, 1], each value v as float32(v / 255).

    The one conversion of the project: the division is correctly rounded, so it equals torch's
    ``x.float() / 255`` in training and evaluation and what export verified the graphs on. (A
    multiplication by float32(1/255) is off by one ulp for some v, enough to flip a near-tie
    token.)
    """
    pixels = np.empty((3, *rgb.shape[:2]), np.float32)
    np.divide(rgb.transpose(2, 0, 1), np.float32(255.0), out=pixels)
    return pixels


def _apply_policy(
    rgb: Image.Image, policy: ResizePolicy, native_size: int, downsample: int, field: str
) -> np.ndarray:
    """uint8 [H, W, 3] the encoder will see (a copy: `rgb` may be closed afterwards)."""
    if policy == "fit":
        return fit_crop(rgb, native_size)
    if policy == "pad":
        return pad_to_multiple(np.asarray(rgb), downsample)
    if model_input_size((rgb.height, rgb.width), "none", native_size, downsample) is None:
        raise Problem(  # unreachable after admission unless EXIF rotation changed the sides
            422,
            "size-not-multiple",
            f"{field}: resize=none needs both sides to be multiples of {downsample}, got "
            f"{rgb.height}x{rgb.width} (H x W); use resize=pad or resize=fit",
            field=field,
            limit=f"multiple of {downsample}",
            value=[rgb.height, rgb.width],
        )
    return np.asarray(rgb)


def _to_rgb(image: Image.Image, *, field: str) -> Image.Image:
    try:
        image.load()
        ImageOps.exif_transpose(image, in_place=True)  # no copy of an upright raster
        if image.mode in ("RGBA", "LA", "PA") or (
            image.mode == "P" and "transparency" in image.info
        ):
            # Transparent pixels have arbitrary colour underneath: show them on white.
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, rgba)
        elif image.mode in _TWO_BYTE_MODES or image.mode == "I":
            # 16-bit greyscale: scale to 8 bits instead of clipping at 255.
            wide = np.asarray(image, dtype=np.float64)
            image = Image.fromarray(np.clip(wide / 257.0, 0, 255).astype(np.uint8))
        # convert() copies even an RGB image: skip it, a 4096² raster is 64 MiB
        return image if image.mode == "RGB" else image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as error:
        raise Problem(
            400,
            "corrupt-image",
            f"{field}: the {image.format or 'image'} data is truncated or corrupt ({error})",
            field=field,
        ) from error


def fit_crop(image: Image.Image, size: int) -> np.ndarray:
    """`fit`: shorter side → `size` (bicubic), centre crop to size × size; uint8 [size, size, 3]."""
    scale = size / min(image.width, image.height)
    width = max(size, math.ceil(image.width * scale - 1e-6))
    height = max(size, math.ceil(image.height * scale - 1e-6))
    if (width, height) != image.size:
        image = image.resize((width, height), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (width - size) // 2, (height - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)))


def pad_to_multiple(array: np.ndarray, multiple: int) -> np.ndarray:
    """`pad`: edge-pad [H, W, ...] on the bottom/right to multiples of `multiple`."""
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


def psnr_from_mse(mse: float) -> float:
    """PSNR in dB of signals in [0, 1]: 10·log10(1 / MSE); inf when the MSE is 0.

    The one PSNR formula of the project (service, evaluation, training logs and plots)."""
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def psnr_db(reference: np.ndarray, reconstruction: np.ndarray) -> float:
    """PSNR in dB of two float arrays in [0, 1]; inf when identical."""
    diff = reference.astype(np.float64) - reconstruction.astype(np.float64)
    return psnr_from_mse(float(np.mean(diff**2)))
