"""Helpers for the service's ASGI tests: a fake engine that needs no model directory.

The fake keeps the real engine's contract (float32 [N,3,H,W] in [0,1] → int64 [N,H/f,W/f] and
back) with arithmetic a test can predict: a token is the mean brightness of its f×f block
quantised to K levels, and decoding paints each block with its level.
"""

from __future__ import annotations

import io
import struct
import threading
import zlib
from dataclasses import dataclass, field

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from service.admission import Limits, ModelGeometry, prepare_upload
from service.app import create_app
from service.images import PreparedImage
from service.settings import Settings


@dataclass(frozen=True)
class FakeInfo:
    id: str = "fake-f8-k16-000000000000"
    codebook_size: int = 16
    downsample: int = 8
    image_size: int = 32
    public: dict = field(
        default_factory=lambda: {
            "id": "fake-f8-k16-000000000000",
            "codebook_size": 16,
            "downsample": 8,
            "image_size": 32,
        }
    )


class FakeEngine:
    def __init__(self) -> None:
        self.info = FakeInfo()
        self.active_providers = ["CPUExecutionProvider"]
        self.batch_sizes: list[int] = []
        self.gate = threading.Event()  # cleared: encode blocks until the test sets it
        self.gate.set()
        self.entered = threading.Event()  # set when a blocked encode has started

    def encode(self, images: np.ndarray) -> np.ndarray:
        self.batch_sizes.append(len(images))
        self.entered.set()
        self.gate.wait(timeout=30)
        f, k = self.info.downsample, self.info.codebook_size
        n, _, h, w = images.shape
        blocks = images.mean(axis=1).reshape(n, h // f, f, w // f, f).mean(axis=(2, 4))
        return np.clip(np.floor(blocks * k), 0, k - 1).astype(np.int64)

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        f, k = self.info.downsample, self.info.codebook_size
        levels = (tokens.astype(np.float32) + 0.5) / k
        grid = np.repeat(np.repeat(levels, f, axis=1), f, axis=2)
        return np.repeat(grid[:, None], 3, axis=1)


def png_bytes(array: np.ndarray, fmt: str = "PNG") -> bytes:
    """uint8 [H, W, 3] → encoded image bytes."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def gradient_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def bomb_png(width: int = 50_000, height: int = 50_000) -> bytes:
    """A tiny PNG whose header claims width×height pixels (a decompression bomb's shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\x00" * 1024)  # far too little data for the claimed size
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
    )


def make_client(engine: FakeEngine, **overrides: object) -> TestClient:
    settings = Settings(model_dir="unused", **overrides)
    return TestClient(create_app(settings, engine=engine), raise_server_exceptions=False)


def decode_upload(
    data: bytes,
    *,
    policy: str,
    native_size: int,
    downsample: int,
    max_pixels: int,
    max_token_grid: int = 10**9,
    field: str = "images",
) -> PreparedImage:
    """The service's admission + image policy for one upload (service.admission)."""
    limits = Limits(
        max_body_bytes=0,
        max_pixels=max_pixels,
        max_images=1,
        max_token_grid=max_token_grid,
        max_request_bytes=0,
    )
    model = ModelGeometry(native_size, downsample, engine_bytes_per_pixel=0)
    return prepare_upload(data, policy=policy, model=model, limits=limits, field=field)  # type: ignore[arg-type]
