"""The FastAPI application: `create_app(settings)`.

    app = create_app(Settings(model_dir="models/default"))   # lifespan loads + warms the engine

Request path: RequestGate (service/admission.py: API key, media type, body size) → routes
(service/routes.py: validate, delegate) → TokenizerService (service/tokenizer.py: admission →
images → MicroBatcher → Engine → wire format). Routes get the service through the typed
dependency in service/deps.py.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema
from starlette.concurrency import run_in_threadpool

from service.admission import RequestGate
from service.allocator import pin_mmap_threshold
from service.drain import CloseConnectionsWhileDraining
from service.engine import Engine
from service.errors import install_problem_handlers
from service.metrics import HTTPMetricsMiddleware, ServiceMetrics
from service.routes import router
from service.schemas import DecodeBatchResponse, EncodeResponse, ProblemDetails
from service.settings import Settings
from service.tokenizer import EngineLike, TokenizerService

log = logging.getLogger("vqtok.service")

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


# -- assembly -----------------------------------------------------------------------------


def create_app(
    settings: Settings | None = None,
    *,
    engine: EngineLike | None = None,
    engine_factory: EngineFactory = load_engine,
) -> FastAPI:
    """The service app. Its lifespan uses `engine` when given, else `engine_factory(settings)`."""
    settings = settings or Settings()
    metrics = ServiceMetrics()
    service = TokenizerService(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pin_mmap_threshold()
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
    api_key = settings.api_key.get_secret_value() if settings.api_key else None
    app.add_middleware(RequestGate, limits=service.limits, api_key=api_key)
    app.add_middleware(HTTPMetricsMiddleware, metrics=metrics, known_paths=lambda: known)
    app.add_middleware(CloseConnectionsWhileDraining, draining=lambda: service.draining)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _state_upload_limits(schemas: dict[str, Any], settings: Settings) -> None:
    # FastAPI describes `list[UploadFile]` as any array of strings; the server wants 1..max_images
    # non-empty files (an empty file is not an image: 415), so the document says so
    binary = {"type": "string", "format": "binary", "minLength": 1}
    for body, field, many in (
        ("Body_encode_v1_encode_post", "images", True),
        ("Body_reconstruct_v1_reconstruct_post", "image", False),
    ):
        properties = schemas.get(body, {}).get("properties", {})
        for option in ("resize", "format"):
            # an empty form value means "not given" to FastAPI: the default applies
            if "enum" in properties.get(option, {}):
                properties[option]["enum"] = [*properties[option]["enum"], ""]
        prop = properties.get(field)
        if prop is None:
            continue
        description = prop.get("description")
        prop.clear()
        if many:
            prop.update(type="array", items=binary, minItems=1, maxItems=settings.max_images)
        else:
            prop.update(binary)
        if description:
            prop["description"] = description


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
    _state_upload_limits(components["schemas"], app.state.settings)
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
