"""What the tokens cost, in context: the PSNR that JPEG, WebP and AVIF (Pillow) reach on the same
images at the same bits per pixel as the tokens.

For each codec and each target rate, every image gets the highest quality whose file fits the
target (target_bpp × pixels / 8 bytes, found by bisection on the codec's quality setting); the
row reports the mean bits per pixel actually spent and the mean per-image PSNR, as evaluation does.
A codec that cannot get that small even at its lowest quality is reported at its smallest file
(`reached: false`). PSNR is service.images' formula, on uint8 RGB, data range 1.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, features

from service.images import psnr_from_mse

# Pillow format name, save options; AVIF at a fast speed setting (the rate barely moves with it)
CODECS: dict[str, tuple[str, dict[str, Any]]] = {
    "JPEG": ("JPEG", {}),
    "WebP": ("WEBP", {"method": 4}),
    "AVIF": ("AVIF", {"speed": 8}),
}
QUALITY_RANGE = (1, 95)


def available_codecs() -> list[str]:
    """The codecs this Pillow build can write (AVIF needs Pillow built with libavif)."""
    checks = {"JPEG": "jpg", "WebP": "webp", "AVIF": "avif"}
    return [name for name, feature in checks.items() if features.check(feature)]


def _encode(rgb: np.ndarray, codec: str, quality: int) -> bytes:
    fmt, options = CODECS[codec]
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format=fmt, quality=quality, **options)
    return buffer.getvalue()


def _psnr(rgb: np.ndarray, data: bytes) -> float:
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64)
    mse = float(np.mean((decoded - rgb.astype(np.float64)) ** 2)) / 255.0**2
    return psnr_from_mse(mse)


def fit_to_rate(rgb: np.ndarray, codec: str, target_bpp: float) -> tuple[float, float, bool]:
    """(bpp spent, PSNR dB, reached) of the best quality whose file fits target_bpp."""
    budget = target_bpp * rgb.shape[0] * rgb.shape[1] / 8.0
    low, high = QUALITY_RANGE
    best = _encode(rgb, codec, low)
    if len(best) > budget:  # even the lowest quality is too big
        return 8.0 * len(best) / (rgb.shape[0] * rgb.shape[1]), _psnr(rgb, best), False
    while low < high:  # largest quality that fits
        mid = (low + high + 1) // 2
        data = _encode(rgb, codec, mid)
        if len(data) <= budget:
            low, best = mid, data
        else:
            high = mid - 1
    return 8.0 * len(best) / (rgb.shape[0] * rgb.shape[1]), _psnr(rgb, best), True


def codec_table(
    images: Sequence[np.ndarray], targets: dict[str, float], codecs: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """One row per (target, codec): mean bpp spent, mean PSNR, whether every image fit."""
    rows = []
    for label, bpp in targets.items():
        for codec in codecs if codecs is not None else available_codecs():
            results = [fit_to_rate(rgb, codec, bpp) for rgb in images]
            rows.append(
                {
                    "target": label,
                    "target_bpp": bpp,
                    "codec": codec,
                    "bpp": float(np.mean([r[0] for r in results])),
                    "psnr": float(np.mean([r[1] for r in results])),
                    "reached": all(r[2] for r in results),
                }
            )
    return rows
