"""The FastAPI application: `create_app(settings)`.

    app = create_app(Settings(model_dir="models/default"))   # lifespan loads + warms the engine

Request path: RequestGate (service/admission.py: API key, media type, body size) → routes
(service/routes.py: validate, delegate) → TokenizerService (service/tokenizer.py: admission →
images → MicroBatcher → Engine → wire format). Routes get the service through the typed
dependency in service/deps.py. The demo page and the offline /docs, /redoc: service/pages.py.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from service.admission import RequestGate
from service.allocator import pin_mmap_threshold
from service.cpu import cpu_quota
from service.drain import CloseConnectionsWhileDraining
from service.engine import Engine
from service.errors import install_problem_handlers
from service.metrics import HTTPMetricsMiddleware, ServiceMetrics
from service.openapi import openapi_document
from service.pages import pages_router
from service.routes import router
from service.settings import Settings
from service.tokenizer import EngineLike, TokenizerService

log = logging.getLogger("vqtok.service")

EngineFactory = Callable[[Settings], EngineLike]


def load_engine(settings: Settings) -> EngineLike:
    """The ONNX engine for `settings`; raises service.engine.EngineError when it cannot start."""
    return Engine(
        settings.model_dir,
        providers=settings.providers,
        # 0 = the CPU quota: onnxruntime's own default counts the host's cores, not the cgroup's
        intra_op_threads=settings.intra_op_threads or cpu_quota(),
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
        docs_url=None,  # service/pages.py serves /docs and /redoc from the package, not a CDN
        redoc_url=None,
    )
    app.state.service = service
    install_problem_handlers(app)
    app.include_router(router)
    pages = pages_router(app.title, app.openapi_url)
    app.include_router(pages)
    known = {getattr(route, "path", "") for route in [*app.routes, *router.routes, *pages.routes]}
    api_key = settings.api_key.get_secret_value() if settings.api_key else None
    app.add_middleware(RequestGate, limits=service.limits, api_key=api_key)
    app.add_middleware(HTTPMetricsMiddleware, metrics=metrics, known_paths=lambda: known)
    app.add_middleware(CloseConnectionsWhileDraining, draining=lambda: service.draining)
    app.openapi = lambda: openapi_document(app, settings)  # type: ignore[method-assign]
    return app
