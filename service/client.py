"""A Python client for a running vqtok service (httpx, numpy, Pillow; no torch).

    from service.client import Client
    with Client("http://127.0.0.1:8000") as client:
        grids = client.encode(["photo.jpg"])                    # -> [TokenGrid]
        images = client.decode(grids)                           # -> [PIL.Image.Image]
        image, psnr = client.reconstruct("photo.jpg")

`AsyncClient` has the same methods as coroutines. Images may be paths, bytes, PIL images or uint8
arrays [H, W, 3]. Tokens travel as base64 uint16 (2 bytes a token instead of ~5 in JSON) whenever
the codebook fits in 16 bits. 503 answers are retried after their Retry-After, a bounded number
of times; every other error is raised as a `ServiceError` built from the problem+json body.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
from PIL import Image

ImageInput = str | os.PathLike[str] | bytes | Image.Image | np.ndarray
IMAGES_PER_REQUEST = 16  # the service's default max_images


class ServiceError(RuntimeError):
    """An error answer of the service: its status and problem+json fields."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status = status
        self.title = str(body.get("title", ""))
        self.detail = str(body.get("detail", ""))
        self.field = body.get("field")
        self.limit = body.get("limit")
        self.value = body.get("value")
        super().__init__(f"{status} {self.title}: {self.detail}")


class ModelMismatch(ServiceError):
    """409: the tokens were made by another model than the one the service runs."""


class Unavailable(ServiceError):
    """503 after every retry: the service is loading, draining or full."""


@dataclass(frozen=True)
class TokenGrid:
    tokens: np.ndarray  # int [h, w]
    model_id: str
    image_size: tuple[int, int]  # (H, W) the encoder saw
    original_size: tuple[int, int]  # (H0, W0) of the upload


def _image_bytes(image: ImageInput) -> bytes:
    if isinstance(image, bytes):
        return image
    if isinstance(image, str | os.PathLike):
        with open(image, "rb") as file:
            return file.read()
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _encode_request(images: Sequence[ImageInput], resize: str) -> dict[str, Any]:
    files = [("images", (f"{i}", _image_bytes(image), "application/octet-stream"))
             for i, image in enumerate(images)]  # fmt: skip
    return {"files": files, "data": {"resize": resize, "format": "base64"}}


def _grids(body: dict[str, Any]) -> list[TokenGrid]:
    model_id = body["model"]["id"]
    return [
        TokenGrid(
            np.frombuffer(base64.b64decode(item["tokens"]), "<u2").reshape(item["shape"]),
            model_id,
            tuple(item["image_size"]),
            tuple(item["original_size"]),
        )
        for item in body["items"]
    ]


def _decode_request(grids: Sequence[TokenGrid | np.ndarray]) -> dict[str, Any]:
    arrays = [np.asarray(g.tokens if isinstance(g, TokenGrid) else g) for g in grids]
    if len({a.shape for a in arrays}) != 1:
        raise ValueError("decode: token grids of one call must share a shape (call per shape)")
    if any(a.min() < 0 or a.max() > 0xFFFF for a in arrays):
        raise ValueError("decode: tokens must lie in [0, 65535]")
    batch = np.stack(arrays).astype("<u2")
    body: dict[str, Any] = {
        "tokens_b64": base64.b64encode(batch.tobytes()).decode(),
        "shape": list(batch.shape),
    }
    ids = {g.model_id for g in grids if isinstance(g, TokenGrid)}
    if len(ids) > 1:
        raise ValueError(f"decode: token grids of different models {sorted(ids)}")
    if ids:
        body["model_id"] = ids.pop()
    return {"json": body}


def _images(body: dict[str, Any]) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(i["png_b64"]))).convert("RGB")
            for i in body["items"]]  # fmt: skip


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        body = response.json()
    except ValueError:
        body = {"title": response.reason_phrase, "detail": response.text[:500]}
    kind = {409: ModelMismatch, 503: Unavailable}.get(response.status_code, ServiceError)
    raise kind(response.status_code, body)


def _retry_after(response: httpx.Response) -> float:
    try:
        return min(float(response.headers.get("retry-after", "1")), 30.0)
    except ValueError:
        return 1.0


class Client:
    """Blocking client; `Client(base_url, api_key=None, timeout=60, retries=3)`."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"X-API-Key": api_key} if api_key else {}
        self._http = httpx.Client(
            base_url=base_url, headers=headers, timeout=timeout, transport=transport
        )
        self.retries = retries

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _post(self, path: str, **kwargs: Any) -> httpx.Response:
        for attempt in range(self.retries + 1):
            response = self._http.post(path, **kwargs)
            if response.status_code != 503 or attempt == self.retries:
                break
            time.sleep(_retry_after(response))
        _raise_for(response)
        return response

    def model(self) -> dict[str, Any]:
        response = self._http.get("/v1/model")
        _raise_for(response)
        return response.json()

    def encode(self, images: Sequence[ImageInput], resize: str = "fit") -> list[TokenGrid]:
        grids: list[TokenGrid] = []
        for chunk in _chunks(list(images), IMAGES_PER_REQUEST):
            grids += _grids(self._post("/v1/encode", **_encode_request(chunk, resize)).json())
        return grids

    def decode(self, grids: Sequence[TokenGrid | np.ndarray]) -> list[Image.Image]:
        images: list[Image.Image] = []
        for chunk in _chunks(list(grids), IMAGES_PER_REQUEST):
            images += _images(self._post("/v1/decode", **_decode_request(chunk)).json())
        return images

    def reconstruct(self, image: ImageInput, resize: str = "fit") -> tuple[Image.Image, float]:
        files = {"image": ("image", _image_bytes(image), "application/octet-stream")}
        response = self._post("/v1/reconstruct", files=files, data={"resize": resize})
        psnr = float(response.headers["x-psnr-db"])
        return Image.open(io.BytesIO(response.content)).convert("RGB"), psnr


class AsyncClient:
    """The same as `Client`, for asyncio: every method is a coroutine."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        headers = {"X-API-Key": api_key} if api_key else {}
        self._http = httpx.AsyncClient(
            base_url=base_url, headers=headers, timeout=timeout, transport=transport
        )
        self.retries = retries

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _post(self, path: str, **kwargs: Any) -> httpx.Response:
        for attempt in range(self.retries + 1):
            response = await self._http.post(path, **kwargs)
            if response.status_code != 503 or attempt == self.retries:
                break
            await asyncio.sleep(_retry_after(response))
        _raise_for(response)
        return response

    async def model(self) -> dict[str, Any]:
        response = await self._http.get("/v1/model")
        _raise_for(response)
        return response.json()

    async def encode(self, images: Sequence[ImageInput], resize: str = "fit") -> list[TokenGrid]:
        grids: list[TokenGrid] = []
        for chunk in _chunks(list(images), IMAGES_PER_REQUEST):
            response = await self._post("/v1/encode", **_encode_request(chunk, resize))
            grids += _grids(response.json())
        return grids

    async def decode(self, grids: Sequence[TokenGrid | np.ndarray]) -> list[Image.Image]:
        images: list[Image.Image] = []
        for chunk in _chunks(list(grids), IMAGES_PER_REQUEST):
            response = await self._post("/v1/decode", **_decode_request(chunk))
            images += _images(response.json())
        return images

    async def reconstruct(
        self, image: ImageInput, resize: str = "fit"
    ) -> tuple[Image.Image, float]:
        files = {"image": ("image", _image_bytes(image), "application/octet-stream")}
        response = await self._post("/v1/reconstruct", files=files, data={"resize": resize})
        psnr = float(response.headers["x-psnr-db"])
        return Image.open(io.BytesIO(response.content)).convert("RGB"), psnr
