"""The FastAPI application: `create_app(settings)`.

    app = create_app(Settings(model_dir="models/default"))   # lifespan loads + warms the engine

Request path: RequestGate (pure ASGI: API key, media type, body-size limit counted while the
body streams) → routes (validate, delegate) → TokenizerService (images → MicroBatcher → Engine
→ wire format). The service object lives on `app.state.service`.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import anyio
import anyio.to_thread
import numpy as np
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.batching import BatcherClosed, MicroBatcher, QueueFull
from service.drain import CloseConnectionsWhileDraining
from service.engine import Engine, InputError
from service.errors import Problem, install_problem_handlers, problem_response
from service.images import PreparedImage, ResizePolicy, decode_upload, encode_png, psnr_db
from service.metrics import HTTPMetricsMiddleware, ServiceMetrics
from service.schemas import (
    DecodeBatchResponse,
    DecodeRequest,
    EncodeResponse,
    ProblemDetails,
    TokenFormat,
    crop_sizes,
    tokens_from_request,
    tokens_to_wire,
)
from service.settings import Settings

log = logging.getLogger("vqtok.service")
T = TypeVar("T")


class EngineLike(Protocol):
    """What the service needs of service.engine.Engine (a fake in unit tests)."""

    info: Any  # ModelInfo: id, codebook_size, downsample, image_size, public
    active_providers: list[str]

    def encode(self, images: np.ndarray) -> np.ndarray: ...
    def decode(self, tokens: np.ndarray) -> np.ndarray: ...


EngineFactory = Callable[[Settings], EngineLike]


def load_engine(settings: Settings) -> EngineLike:
    """The ONNX engine for `settings`; raises service.engine.EngineError when it cannot start."""
    return Engine(
        settings.model_dir,
        providers=settings.providers,
        intra_op_threads=settings.intra_op_threads,
        inter_op_threads=settings.inter_op_threads,
        warmup=settings.warmup,
    )


@dataclass(frozen=True)
class Reconstruction:
    png: bytes
    psnr_db: float
    size: tuple[int, int]


class TokenizerService:
    """Engine + batcher + metrics: the work behind every route."""

    def __init__(self, settings: Settings, metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.engine: EngineLike | None = None
        self.batcher: MicroBatcher | None = None
        self.draining = False
        self._image_limiter = anyio.CapacityLimiter(settings.image_threads)

    # -- lifecycle ------------------------------------------------------------------------

    def attach(self, engine: EngineLike) -> None:
        s = self.settings
        self.engine = engine
        self.metrics.code_usage.reset(int(engine.info.codebook_size))
        self.batcher = MicroBatcher(
            {"encode": engine.encode, "decode": engine.decode},
            max_batch=s.max_batch,
            max_wait_ms=s.max_wait_ms,
            max_queue=s.max_queue,
            on_batch=self.metrics.observe_batch,
        )
        self.metrics.track_queue(lambda: self.batcher.queue_depth if self.batcher else 0)
        self.batcher.start()

    def begin_drain(self) -> None:
        """SIGTERM: report not-ready; uvicorn stops accepting and lets accepted work finish."""
        if not self.draining:
            log.info("draining: /health/ready now answers 503")
        self.draining = True

    async def shutdown(self) -> None:
        self.draining = True
        if self.batcher is not None:
            finished = await self.batcher.aclose(timeout=self.settings.drain_timeout_s)
            if not finished:
                log.warning("batcher still busy after %.1f s", self.settings.drain_timeout_s)

    @property
    def ready(self) -> bool:
        return self.engine is not None and not self.draining

    # -- operations -----------------------------------------------------------------------

    async def _image_work(self, fn: Callable[[], T]) -> T:
        # Image decoding/encoding runs off the event loop, but on at most `image_threads`
        # threads: 64 concurrent uploads decoded at once would starve the engine of the cores.
        return await anyio.to_thread.run_sync(fn, limiter=self._image_limiter)

    def _require_engine(self) -> tuple[EngineLike, MicroBatcher]:
        if self.engine is None or self.batcher is None:
            raise self._unavailable("the model is not loaded yet")
        return self.engine, self.batcher

    def _unavailable(self, why: str) -> Problem:
        return Problem(
            503, "unavailable", why, headers={"Retry-After": str(self.settings.retry_after_s)}
        )

    def model_ref(self) -> dict[str, Any]:
        engine, _ = self._require_engine()
        info = engine.info
        return {
            "id": info.id,
            "codebook_size": int(info.codebook_size),
            "downsample": int(info.downsample),
        }

    def model_card(self) -> dict[str, Any]:
        engine, _ = self._require_engine()
        return dict(engine.info.public)

    async def _run(self, operation: str, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        _, batcher = self._require_engine()
        try:
            return await batcher.submit(operation, arrays)
        except QueueFull as full:
            self.metrics.rejected.inc(full.requested)
            raise Problem(
                503,
                "queue-full",
                f"the service is at capacity ({full}); retry after {self.settings.retry_after_s} s",
                field="queue",
                limit=full.limit,
                value=full.queued + full.requested,
                headers={"Retry-After": str(self.settings.retry_after_s)},
            ) from full
        except BatcherClosed as closed:
            raise self._unavailable(str(closed)) from closed
        except InputError as error:  # the engine's io contract: names field, limit and value
            raise Problem(
                422,
                "invalid-input",
                str(error),
                field=error.field,
                limit=error.limit,
                value=error.value,
            ) from error

    async def prepare(self, uploads: Sequence[bytes], policy: ResizePolicy) -> list[PreparedImage]:
        engine, _ = self._require_engine()
        s, info = self.settings, engine.info
        if len(uploads) > s.max_images:
            raise Problem(
                413,
                "too-many-images",
                f"images: {len(uploads)} files; the limit is {s.max_images} per request",
                field="images",
                limit=s.max_images,
                value=len(uploads),
            )

        def decode_all() -> list[PreparedImage]:
            many = len(uploads) > 1
            return [
                decode_upload(
                    data,
                    policy=policy,
                    native_size=int(info.image_size),
                    downsample=int(info.downsample),
                    max_pixels=s.max_pixels,
                    field=f"images[{index}]" if many else "images",
                )
                for index, data in enumerate(uploads)
            ]

        prepared = await self._image_work(decode_all)
        for index, image in enumerate(prepared):
            h, w = image.image_size
            grid = (h // int(info.downsample)) * (w // int(info.downsample))
            if grid > s.max_token_grid:
                raise Problem(
                    413,
                    "token-grid-too-large",
                    f"images[{index}]: {h}x{w} would give {grid} tokens; the limit is "
                    f"{s.max_token_grid} per image (use resize=fit or a smaller image)",
                    field=f"images[{index}]",
                    limit=s.max_token_grid,
                    value=grid,
                )
        return prepared

    async def encode(
        self, uploads: Sequence[bytes], policy: ResizePolicy, fmt: TokenFormat
    ) -> dict[str, Any]:
        engine, _ = self._require_engine()
        if fmt == "base64" and int(engine.info.codebook_size) > 1 << 16:
            raise Problem(
                422,
                "format-unavailable",
                f"format: base64 carries uint16 tokens; this model has "
                f"{engine.info.codebook_size} codes, use format=json",
                field="format",
                limit=1 << 16,
                value=int(engine.info.codebook_size),
            )
        prepared = await self.prepare(uploads, policy)
        tokens = await self._run("encode", [image.pixels for image in prepared])
        for grid in tokens:
            self.metrics.observe_tokens(grid)
        items = [
            {
                "shape": [int(grid.shape[0]), int(grid.shape[1])],
                "tokens": tokens_to_wire(grid, fmt),
                "image_size": list(image.image_size),
                "original_size": list(image.original_size),
            }
            for image, grid in zip(prepared, tokens)
        ]
        return {"model": self.model_ref(), "format": fmt, "items": items}

    async def decode(
        self, request: DecodeRequest
    ) -> tuple[list[bytes], list[tuple[int, int]], bool]:
        engine, _ = self._require_engine()
        info, s = engine.info, self.settings
        if request.model_id is not None and request.model_id != info.id:
            raise Problem(
                409,
                "model-mismatch",
                f"model_id: tokens were made by {request.model_id!r}, this service runs "
                f"{info.id!r}; tokens only mean something to the model that made them",
                field="model_id",
                limit=info.id,
                value=request.model_id,
            )
        tokens, single = tokens_from_request(
            request,
            codebook_size=int(info.codebook_size),
            max_grid=s.max_token_grid,
            max_images=s.max_images,
        )
        f = int(info.downsample)
        full = (tokens.shape[1] * f, tokens.shape[2] * f)
        sizes = crop_sizes(request.original_size, len(tokens), full)
        images = await self._run("decode", list(tokens))

        def to_pngs() -> list[bytes]:
            return [encode_png(image, crop_to=size) for image, size in zip(images, sizes)]

        return await self._image_work(to_pngs), sizes, single

    async def reconstruct(self, upload: bytes, policy: ResizePolicy) -> Reconstruction:
        (image,) = await self.prepare([upload], policy)
        (tokens,) = await self._run("encode", [image.pixels])
        self.metrics.observe_tokens(tokens)
        (output,) = await self._run("decode", [tokens])
        # pad: compare and return only the original region; fit/none: the whole model input.
        size = image.original_size if policy == "pad" else image.image_size

        def finish() -> Reconstruction:
            h, w = size
            psnr = psnr_db(image.pixels[:, :h, :w], np.clip(output[:, :h, :w], 0.0, 1.0))
            return Reconstruction(encode_png(output, crop_to=size), psnr, size)

        return await self._image_work(finish)


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

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.limit = settings.max_body_bytes
        key = settings.api_key.get_secret_value() if settings.api_key else None
        self.api_key = key.encode() if key else None

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
        if scope["method"] == "POST" and path in BODY_MEDIA_TYPES:
            refusal = self._check_headers(path, headers)
            if refusal is not None:
                await problem_response(refusal, path)(scope, receive, send)
                return
        await self._forward_counting(scope, receive, send)

    def _authorised(self, headers: dict[str, bytes]) -> bool:
        assert self.api_key is not None
        given = headers.get("x-api-key")
        authorization = headers.get("authorization", b"")
        if given is None and authorization[:7].lower() == b"bearer ":
            given = authorization[7:].strip()
        # Constant-time: the comparison leaks nothing about how much of the key matched.
        return given is not None and hmac.compare_digest(given, self.api_key)

    def _check_headers(self, path: str, headers: dict[str, bytes]) -> Problem | None:
        length = headers.get("content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                return Problem(400, "malformed-header", "Content-Length is not an integer")
            if declared > self.limit:
                return _body_too_large(self.limit, declared)
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
                f"{path} takes multipart/form-data (files in the `images` field); "
                "no Content-Type was sent",
                field="Content-Type",
                limit=list(allowed),
            )
        return None

    async def _forward_counting(self, scope: Scope, receive: Receive, send: Send) -> None:
        received = 0
        exceeded = False
        response_started = False

        async def counting_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
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
            response = problem_response(_body_too_large(self.limit, received), scope["path"])
            response.headers["Connection"] = "close"
            await response(scope, receive, send)


def _body_too_large(limit: int, value: int) -> Problem:
    return Problem(
        413,
        "body-too-large",
        f"request body is {value} bytes or more; the limit is {limit} bytes",
        field="body",
        limit=limit,
        value=value,
    )


# -- assembly -----------------------------------------------------------------------------


def create_app(
    settings: Settings | None = None,
    *,
    engine: EngineLike | None = None,
    engine_factory: EngineFactory = load_engine,
) -> FastAPI:
    """The service app. Its lifespan uses `engine` when given, else `engine_factory(settings)`."""
    from service.routes import router

    settings = settings or Settings()
    metrics = ServiceMetrics()
    service = TokenizerService(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loaded = engine if engine is not None else await run_in_threadpool(engine_factory, settings)
        service.attach(loaded)
        log.info(
            "serving model %s on %s (max_batch=%d, max_wait_ms=%g, max_queue=%d)",
            loaded.info.id,
            ",".join(loaded.active_providers),
            settings.max_batch,
            settings.max_wait_ms,
            settings.max_queue,
        )
        try:
            yield
        finally:
            await service.shutdown()

    app = FastAPI(
        title="vqtok",
        summary="VQ-VAE image tokenizer: images → integer tokens → images",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.settings = settings
    install_problem_handlers(app)
    app.include_router(router)
    known = {getattr(route, "path", "") for route in [*app.routes, *router.routes]}
    app.add_middleware(RequestGate, settings=settings)
    app.add_middleware(HTTPMetricsMiddleware, metrics=metrics, known_paths=lambda: known)
    app.add_middleware(CloseConnectionsWhileDraining, draining=lambda: service.draining)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title, version=app.version, summary=app.summary, routes=app.routes
    )
    # Schemas referenced only from hand-written `responses` entries (problem+json, the decode
    # batch answer) are not collected by FastAPI: add them to components.
    _, extra = models_json_schema(
        [
            (ProblemDetails, "serialization"),
            (DecodeBatchResponse, "serialization"),
            (EncodeResponse, "serialization"),
        ],
        ref_template="#/components/schemas/{model}",
    )
    components = schema.setdefault("components", {})
    for name, definition in extra.get("$defs", {}).items():
        components.setdefault("schemas", {}).setdefault(name, definition)
    if app.state.settings.api_key is not None:
        components["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
        }
        for path, operations in schema["paths"].items():
            if path.startswith("/v1/"):
                for operation in operations.values():
                    operation["security"] = [{"bearer": []}, {"apiKey": []}]
    app.openapi_schema = schema
    return schema
