"""The upload policy: size checks before decoding, EXIF, alpha, resize policies, PNG output."""

from __future__ import annotations

import io
import tracemalloc

import numpy as np
import pytest
from PIL import Image
from service_fakes import bomb_png, decode_upload, gradient_image, png_bytes

from service.images import encode_png, psnr_db
from service.problems import Problem

POLICY = {"native_size": 32, "downsample": 8, "max_pixels": 1_000_000}


def test_fit_resizes_shorter_side_and_centre_crops() -> None:
    # A 40×80 image whose left and right quarters are black, the centre white: after fit
    # (shorter side 40 → 32, width 64, crop the middle 32) only white remains.
    array = np.zeros((40, 80, 3), dtype=np.uint8)
    array[:, 20:60] = 255
    prepared = decode_upload(png_bytes(array), policy="fit", **POLICY)
    assert prepared.pixels.shape == (3, 32, 32)
    assert prepared.pixels.dtype == np.float32
    assert prepared.original_size == (40, 80)
    assert prepared.pixels.min() > 0.95


def test_pad_keeps_pixels_and_reports_original_size() -> None:
    array = gradient_image(13, 21)
    prepared = decode_upload(png_bytes(array), policy="pad", **POLICY)
    assert prepared.image_size == (16, 24)
    assert prepared.original_size == (13, 21)
    np.testing.assert_allclose(
        prepared.pixels[:, :13, :21] * 255, array.transpose(2, 0, 1), atol=1e-3
    )


def test_none_refuses_sizes_that_are_not_a_multiple_of_f() -> None:
    with pytest.raises(Problem) as caught:
        decode_upload(png_bytes(gradient_image(20, 24)), policy="none", **POLICY)
    assert caught.value.status == 422
    assert caught.value.value == [20, 24]
    assert "multiples of 8" in caught.value.detail
    ok = decode_upload(png_bytes(gradient_image(16, 24)), policy="none", **POLICY)
    assert ok.image_size == (16, 24)


def test_exif_orientation_is_applied() -> None:
    array = gradient_image(16, 32)
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", exif=exif)
    prepared = decode_upload(buffer.getvalue(), policy="none", **POLICY)
    assert prepared.original_size == (32, 16)


def test_transparent_pixels_become_white() -> None:
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)  # fully transparent black
    prepared = decode_upload(png_bytes(rgba), policy="none", **POLICY)
    assert prepared.pixels.min() == 1.0


def test_greyscale_and_jpeg_are_read_as_rgb() -> None:
    grey = np.full((16, 16), 128, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, format="JPEG")
    prepared = decode_upload(buffer.getvalue(), policy="none", **POLICY)
    assert prepared.pixels.shape == (3, 16, 16)
    assert abs(float(prepared.pixels.mean()) - 128 / 255) < 0.02


def test_decompression_bomb_is_refused_from_the_header_without_decoding() -> None:
    tracemalloc.start()
    try:
        with pytest.raises(Problem) as caught:
            decode_upload(bomb_png(), policy="fit", **POLICY)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert caught.value.status == 413
    assert caught.value.value == 50_000 * 50_000
    assert caught.value.limit == 1_000_000
    assert peak < 10 * 1024 * 1024  # decoding it would need 7.5 GB


def test_over_the_pixel_limit_but_under_pillows_own_limit_names_the_size() -> None:
    with pytest.raises(Problem) as caught:
        decode_upload(bomb_png(2000, 1000), policy="fit", **POLICY)
    assert caught.value.status == 413
    assert caught.value.value == 2_000_000
    assert "1000x2000" in caught.value.detail


def test_non_image_and_truncated_image() -> None:
    with pytest.raises(Problem) as caught:
        decode_upload(b"hello, I am text", policy="fit", **POLICY)
    assert caught.value.status == 415
    assert "not an image" in caught.value.detail
    data = png_bytes(gradient_image(64, 64))
    with pytest.raises(Problem) as caught:
        decode_upload(data[: len(data) // 2], policy="fit", **POLICY)
    assert caught.value.status == 400
    assert "truncated" in caught.value.detail


def test_encode_png_round_trips_and_crops() -> None:
    array = gradient_image(16, 24)
    pixels = array.transpose(2, 0, 1).astype(np.float32) / 255
    decoded = np.asarray(Image.open(io.BytesIO(encode_png(pixels, crop_to=(10, 20)))))
    np.testing.assert_array_equal(decoded, array[:10, :20])
    assert psnr_db(pixels, pixels) == float("inf")
    assert psnr_db(np.zeros(4), np.full(4, 0.1)) == pytest.approx(20.0)
