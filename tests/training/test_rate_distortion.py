"""Image codecs at the tokens' bit rate: the file fits the budget, more bits never cost PSNR."""

from __future__ import annotations

import numpy as np
import pytest

from training.rate_distortion import available_codecs, codec_table, fit_to_rate


def _photo_like(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:96, 0:128]
    smooth = np.stack([np.sin(x / 9.0 + c) * np.cos(y / 13.0) for c in range(3)], -1)
    noisy = 127.5 + 90 * smooth + rng.normal(0, 12, smooth.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("codec", available_codecs())
def test_the_file_fits_and_more_bits_do_not_lose_psnr(codec: str) -> None:
    rgb = _photo_like()
    low_bpp, low_psnr, low_ok = fit_to_rate(rgb, codec, 0.6)
    high_bpp, high_psnr, high_ok = fit_to_rate(rgb, codec, 2.0)
    assert high_ok and high_bpp <= 2.0
    if low_ok:
        assert low_bpp <= 0.6
    assert high_psnr >= low_psnr


def test_an_unreachable_rate_is_reported_as_such() -> None:
    bpp, psnr, reached = fit_to_rate(_photo_like(), "JPEG", 0.001)
    assert not reached and bpp > 0.001 and np.isfinite(psnr)


def test_the_table_has_one_row_per_rate_and_codec() -> None:
    rows = codec_table([_photo_like(0), _photo_like(1)], {"a": 1.0, "b": 2.0}, ["JPEG"])
    assert [(r["target"], r["codec"]) for r in rows] == [("a", "JPEG"), ("b", "JPEG")]
    assert rows[1]["psnr"] >= rows[0]["psnr"]
