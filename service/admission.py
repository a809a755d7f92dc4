"""Admission: every request limit, decided before any pixel is decoded.

One module answers "may this request run, and what will it cost?":
- `RequestGate` (pure ASGI, before any route): API key, body media type, body size (declared
  Content-Length up front; chunked bodies counted while they stream). `/v1/decode` bodies are
  capped by the largest token batch they may carry, so no oversized JSON is ever parsed.
- `admit_uploads` (image headers only): images per request, pixels per image, the token grid the
  resize policy will produce, and the request's memory cost, which must fit `max_request_bytes`.
- `admit_token_grids`: grids per decode request and tokens per grid, from the shape alone.
- `MemoryBudget`: the process-wide budget of decoded bytes in flight; a request that does not
  fit waits up to `admission_wait_s`, then gets 503 + Retry-After.

A request's cost counts what it holds while it runs: the largest decoded raster (uploads are
decoded one at a time), every model input (float32), and the engine's working memory for its
largest image (measured per model pixel: `python -m benchmarks.abuse engine-memory`).
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass

from PIL import Image
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import problem_response
from service.images import (
    PreparedImage,
    ResizePolicy,
    TooManyPixels,
    decode_bytes_estimate,
    decode_image,
    model_input_size,
    open_image,
)
from service.problems import Problem

# Engine working memory per model pixel is proportional to the encoder/decoder width at full
# resolution: onnxruntime peaked at 569 (encode) and 665 (decode) bytes per pixel for the default
# model (base_channels 32) at 256-1024 px, `python -m benchmarks.abuse engine-memory`.
ENGINE_BYTES_PER_PIXEL_PER_CHANNEL = 22
FLOAT_INPUT_BYTES_PER_PIXEL = 3 * 4  # float32 [3, H, W]
# A JSON token is at most "65535," with whitespace around: generous so valid bodies always pass
JSON_BYTES_PER_TOKEN = 8
JSON_BODY_OVERHEAD = 64 * 1024


@dataclass(frozen=True)
class Limits:
    """The request limits (service/settings.py has their documentation and defaults)."""

    max_body_bytes: int
    max_pixels: int
    max_images: int
    max_token_grid: int
    max_request_bytes: int

    @classmethod
    def from_settings(cls, settings: object) -> Limits:
        return cls(**{name: getattr(settings, name) for name in cls.__dataclass_fields__})

    @property
    def max_decode_body_bytes(self) -> int:
        """The largest /v1/decode body that can be valid: a full batch of full grids."""
        tokens = self.max_images * self.max_token_grid
        return min(self.max_body_bytes, tokens * JSON_BYTES_PER_TOKEN + JSON_BODY_OVERHEAD)


@dataclass(frozen=True)
class ModelGeometry:
    """What admission needs to know of the served model (from model.json)."""

    native_size: int
    downsample: int
    engine_bytes_per_pixel: int

    @classmethod
    def from_model_info(cls, info: object) -> ModelGeometry:
        config = getattr(info, "public", {}).get("model_config") or {}
        channels = int(config.get("base_channels", 32))
        return cls(
            native_size=int(info.image_size),  # type: ignore[attr-defined]
            downsample=int(info.downsample),  # type: ignore[attr-defined]
            engine_bytes_per_pixel=ENGINE_BYTES_PER_PIXEL_PER_CHANNEL * channels,
        )


@dataclass(frozen=True)
class AdmittedImage:
    """An upload whose header passed every limit; nothing decoded yet."""

    image: Image.Image  # opened lazily
    field: str
    model_size: tuple[int, int]  # (H, W) the encoder will see
    decode_bytes: int

    @property
    def input_bytes(self) -> int:
        return FLOAT_INPUT_BYTES_PER_PIXEL * self.model_size[0] * self.model_size[1]


@dataclass(frozen=True)
class AdmittedRequest:
    images: list[AdmittedImage]
    cost_bytes: int  # what the request may hold at once while it runs


def admit_image(
    data: bytes, *, policy: ResizePolicy, model: ModelGeometry, limits: Limits, field: str
) -> AdmittedImage:
    """Check one upload from its header: readable, pixels, policy geometry, token grid."""
    try:
        image = open_image(data, field=field)
    except TooManyPixels as error:
        raise _too_many_pixels(field, limits.max_pixels, error.pixels, None) from error
    width, height = image.size
    if width < 1 or height < 1:
        raise Problem(422, "empty-image", f"{field}: image has no pixels", field=field)
    if width * height > limits.max_pixels:
        raise _too_many_pixels(field, limits.max_pixels, width * height, (height, width))
    f = model.downsample
    size = model_input_size((height, width), policy, model.native_size, f)
    if size is None:
        raise Problem(
            422,
            "size-not-multiple",
            f"{field}: resize=none needs both sides to be multiples of {f}, got "
            f"{height}x{width} (H x W); use resize=pad or resize=fit",
            field=field,
            limit=f"multiple of {f}",
            value=[height, width],
        )
    grid = (size[0] // f) * (size[1] // f)
    if grid > limits.max_token_grid:
        raise Problem(
            413,
            "token-grid-too-large",
            f"{field}: {height}x{width} with resize={policy} would give {grid} tokens; the limit "
            f"is {limits.max_token_grid} per image (use resize=fit or a smaller image)",
            field=field,
            limit=limits.max_token_grid,
            value=grid,
        )
    return AdmittedImage(image, field, size, decode_bytes_estimate(image, policy))


def admit_uploads(
    uploads: Sequence[bytes],
    *,
    policy: ResizePolicy,
    model: ModelGeometry,
    limits: Limits,
    field: str = "images",
) -> AdmittedRequest:
    """Check a whole encode request from headers; raises the first limit it breaks."""
    if not uploads:
        raise Problem(422, "no-images", f"{field}: the request holds no file", field=field)
    if len(uploads) > limits.max_images:
        raise Problem(
            413,
            "too-many-images",
            f"{field}: {len(uploads)} files; the limit is {limits.max_images} per request",
            field=field,
            limit=limits.max_images,
            value=len(uploads),
        )
    many = len(uploads) > 1
    images = [
        admit_image(
            data,
            policy=policy,
            model=model,
            limits=limits,
            field=f"{field}[{index}]" if many else field,
        )
        for index, data in enumerate(uploads)
    ]
    largest = max(h * w for h, w in (image.model_size for image in images))
    cost = (
        max(image.decode_bytes for image in images)
        + sum(image.input_bytes for image in images)
        + model.engine_bytes_per_pixel * largest
    )
    _check_request_cost(cost, limits, field)
    return AdmittedRequest(images, cost)


def admit_token_grids(
    shape: Sequence[int], *, model: ModelGeometry, limits: Limits, field: str
) -> int:
    """Check a decode batch [n, h, w] from its shape; returns the request's memory cost."""
    n, h, w = shape
    if h * w > limits.max_token_grid:
        raise Problem(
            413,
            "token-grid-too-large",
            f"{field}: token grid {h}x{w} = {h * w} tokens; the limit is "
            f"{limits.max_token_grid} per grid",
            field=field,
            limit=limits.max_token_grid,
            value=h * w,
        )
    if n > limits.max_images:
        raise Problem(
            413,
            "too-many-images",
            f"{field}: batch of {n} grids; the limit is {limits.max_images} per request",
            field=field,
            limit=limits.max_images,
            value=n,
        )
    pixels = h * w * model.downsample**2
    # float32 outputs + uint8 PNG rasters for every image, engine memory for one at a time
    cost = n * pixels * (FLOAT_INPUT_BYTES_PER_PIXEL + 4) + model.engine_bytes_per_pixel * pixels
    _check_request_cost(cost, limits, field)
    return cost


def prepare_uploads(
    admitted: AdmittedRequest, *, policy: ResizePolicy, model: ModelGeometry
) -> list[PreparedImage]:
    """Decode the admitted uploads one at a time (each raster is freed before the next)."""
    return [
        decode_image(
            image.image,
            policy=policy,
            native_size=model.native_size,
            downsample=model.downsample,
            field=image.field,
        )
        for image in admitted.images
    ]


def prepare_upload(
    data: bytes, *, policy: ResizePolicy, model: ModelGeometry, limits: Limits, field: str
) -> PreparedImage:
    """One upload through admission and the image policy (offline tokenizing, tests)."""
    admitted = admit_image(data, policy=policy, model=model, limits=limits, field=field)
    return decode_image(
        admitted.image,
        policy=policy,
        native_size=model.native_size,
        downsample=model.downsample,
        field=field,
    )


def _check_request_cost(cost: int, limits: Limits, field: str) -> None:
    if cost > limits.max_request_bytes:
        raise Problem(
            413,
            "request-too-costly",
            f"{field}: decoding and encoding this request needs about {_mib(cost)}; the limit "
            f"is {_mib(limits.max_request_bytes)} per request (send fewer or smaller images, "
            "or resize=fit)",
            field=field,
            limit=limits.max_request_bytes,
            value=cost,
        )


def _mib(nbytes: int) -> str:
    return f"{nbytes / (1 << 20):.1f} MiB"


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


class MemoryBudget:
    """Process-wide bytes in flight: `async with budget.reserve(n):` waits, then 503s."""

    def __init__(self, capacity: int, wait_s: float, retry_after_s: int) -> None:
        self.capacity = capacity
        self.wait_s = wait_s
        self.retry_after_s = retry_after_s
        self.in_use = 0
        self._changed: asyncio.Condition | None = None  # made on the serving loop

    @asynccontextmanager
    async def reserve(self, nbytes: int) -> AsyncIterator[None]:
        if self._changed is None:
            self._changed = asyncio.Condition()
        changed = self._changed
        async with changed:
            fits = lambda: self.in_use + nbytes <= self.capacity  # noqa: E731
            if not fits():
                try:
                    await asyncio.wait_for(changed.wait_for(fits), self.wait_s)
                except TimeoutError:
                    raise self._busy(nbytes) from None
            self.in_use += nbytes
        try:
            yield
        finally:
            async with changed:
                self.in_use -= nbytes
                changed.notify_all()

    def _busy(self, nbytes: int) -> Problem:
        return Problem(
            503,
            "memory-busy",
            f"the service is decoding {_mib(self.in_use)} of other requests; this one needs "
            f"{_mib(nbytes)} of the {_mib(self.capacity)} budget; retry after "
            f"{self.retry_after_s} s",
            field="memory",
            limit=self.capacity,
            value=self.in_use + nbytes,
            headers={"Retry-After": str(self.retry_after_s)},
        )


# -- the gate: checks that need no body ---------------------------------------------------

# Which POST bodies each route takes; anything else is a 415 before the body is read.
BODY_MEDIA_TYPES = {
    "/v1/encode": ("multipart/form-data",),
    "/v1/reconstruct": ("multipart/form-data",),
    "/v1/decode": ("application/json",),
}


class BodyTooLarge(Exception):
    pass


class RequestGate:
    """Pure ASGI middleware: API key, body media type and body size, before any route runs.

    The size limit is checked against Content-Length up front and, for chunked bodies (no
    Content-Length), counted while the body streams: the request is cut off with 413 as soon
    as it passes the limit, whatever the route was doing with it.
    """

    def __init__(self, app: ASGIApp, limits: Limits, api_key: str | None) -> None:
        self.app = app
        self.body_limits = {path: limits.max_body_bytes for path in BODY_MEDIA_TYPES}
        self.body_limits["/v1/decode"] = limits.max_decode_body_bytes
        self.api_key = api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        headers = {name.decode("latin-1").lower(): value for name, value in scope["headers"]}
        if path.startswith("/v1/") and self.api_key is not None and not self._authorised(headers):
            problem = Problem(
                401,
                "unauthorized",
                "this service needs an API key: send `Authorization: Bearer <key>` or "
                "`X-API-Key: <key>`",
                field="Authorization",
                headers={"WWW-Authenticate": 'Bearer realm="vqtok"'},
            )
            await problem_response(problem, path)(scope, receive, send)
            return
        limit = self.body_limits.get(path)
        if scope["method"] == "POST" and limit is not None:
            refusal = _check_headers(path, headers, limit)
            if refusal is not None:
                await problem_response(refusal, path)(scope, receive, send)
                return
            await self._forward_counting(scope, receive, send, limit)
            return
        await self.app(scope, receive, send)

    def _authorised(self, headers: dict[str, bytes]) -> bool:
        assert self.api_key is not None
        given = headers.get("x-api-key")
        authorization = headers.get("authorization", b"")
        if given is None and authorization[:7].lower() == b"bearer ":
            given = authorization[7:].strip()
        # Constant-time: the comparison leaks nothing about how much of the key matched.
        return given is not None and hmac.compare_digest(given, self.api_key)

    async def _forward_counting(
        self, scope: Scope, receive: Receive, send: Send, limit: int
    ) -> None:
        received = 0
        exceeded = False
        response_started = False

        async def counting_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if exceeded:
                return  # whatever the app answers after the cut-off, the client gets 413
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        with suppress(BodyTooLarge):
            await self.app(scope, counting_receive, guarded_send)
        if exceeded and not response_started:
            response = problem_response(
                _body_too_large(limit, received, scope["path"]), scope["path"]
            )
            response.headers["Connection"] = "close"
            await response(scope, receive, send)


def _check_headers(path: str, headers: dict[str, bytes], limit: int) -> Problem | None:
    length = headers.get("content-length")
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            return Problem(400, "malformed-header", "Content-Length is not an integer")
        if declared > limit:
            return _body_too_large(limit, declared, path)
    media_type = headers.get("content-type", b"").decode("latin-1").split(";")[0].strip()
    allowed = BODY_MEDIA_TYPES[path]
    if media_type and media_type.lower() not in allowed:
        return Problem(
            415,
            "unsupported-media-type",
            f"{path} takes {' or '.join(allowed)}, got {media_type!r}",
            field="Content-Type",
            limit=list(allowed),
            value=media_type,
        )
    if not media_type and allowed[0].startswith("multipart/"):
        return Problem(
            415,
            "unsupported-media-type",
            f"{path} takes multipart/form-data (files in the `images` or `image` field); "
            "no Content-Type was sent",
            field="Content-Type",
            limit=list(allowed),
        )
    return None


def _body_too_large(limit: int, value: int, path: str) -> Problem:
    why = (
        " (the largest valid token batch: max_images x max_token_grid tokens)"
        if path == "/v1/decode"
        else ""
    )
    return Problem(
        413,
        "body-too-large",
        f"request body is {value} bytes or more; the limit is {limit} bytes{why}",
        field="body",
        limit=limit,
        value=value,
    )
