"""The work behind every route: admission → image policy → micro-batcher → engine → wire format.

    service = TokenizerService(settings, metrics)
    service.attach(engine)                       # at startup (the app's lifespan)
    body = await service.encode(uploads, "fit", "json")

Routes validate the HTTP shape of a request and delegate here; nothing in this module knows
about HTTP beyond raising `Problem`s.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import anyio
import anyio.to_thread
import numpy as np

from service.admission import (
    Limits,
    MemoryBudget,
    ModelGeometry,
    admit_token_grids,
    admit_uploads,
    prepare_uploads,
)
from service.batching import BatcherClosed, MicroBatcher, QueueFull
from service.engine import InputError
from service.images import ResizePolicy, encode_png, psnr_db
from service.metrics import ServiceMetrics
from service.problems import Problem
from service.schemas import (
    DecodeRequest,
    TokenFormat,
)
from service.settings import Settings
from service.token_codec import check_codes, crop_sizes, tokens_from_request, tokens_to_wire

log = logging.getLogger("vqtok.service")
T = TypeVar("T")


class EngineLike(Protocol):
    """What the service needs of service.engine.Engine (a fake in unit tests)."""

    info: Any  # ModelInfo: id, codebook_size, downsample, image_size, public
    active_providers: list[str]

    def encode(self, images: np.ndarray) -> np.ndarray: ...
    def decode(self, tokens: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class Reconstruction:
    png: bytes
    psnr_db: float
    size: tuple[int, int]


@dataclass(frozen=True)
class Decoded:
    pngs: list[bytes]
    sizes: list[tuple[int, int]]
    single: bool  # the request sent one [h][w] grid (answer: one PNG)


class TokenizerService:
    """Engine + batcher + memory budget + metrics."""

    def __init__(self, settings: Settings, metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.limits = Limits.from_settings(settings)
        self.budget = MemoryBudget(
            settings.max_inflight_bytes, settings.admission_wait_s, settings.retry_after_s
        )
        self.engine: EngineLike | None = None
        self.batcher: MicroBatcher | None = None
        self.geometry: ModelGeometry | None = None
        self.draining = False
        self._image_limiter = anyio.CapacityLimiter(settings.image_threads)

    # -- lifecycle ------------------------------------------------------------------------

    def attach(self, engine: EngineLike) -> None:
        s = self.settings
        self.engine = engine
        self.geometry = ModelGeometry.from_model_info(engine.info)
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
        """SIGTERM: report not-ready and close keep-alive connections after their response."""
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

    def not_ready(self) -> Problem:
        why = "draining: shutting down" if self.draining else "loading the model"
        return self._unavailable(f"not ready: {why}", kind="not-ready")

    # -- model facts ----------------------------------------------------------------------

    def _require_engine(self) -> tuple[EngineLike, MicroBatcher, ModelGeometry]:
        if self.engine is None or self.batcher is None or self.geometry is None:
            raise self._unavailable("the model is not loaded yet")
        return self.engine, self.batcher, self.geometry

    def _unavailable(self, why: str, kind: str = "unavailable") -> Problem:
        return Problem(503, kind, why, headers={"Retry-After": str(self.settings.retry_after_s)})

    def model_ref(self) -> dict[str, Any]:
        info = self._require_engine()[0].info
        return {
            "id": info.id,
            "codebook_size": int(info.codebook_size),
            "downsample": int(info.downsample),
        }

    def model_card(self) -> dict[str, Any]:
        return dict(self._require_engine()[0].info.public)

    # -- operations -----------------------------------------------------------------------

    async def _image_work(self, fn: Callable[[], T]) -> T:
        # Image decoding/encoding runs off the event loop, but on at most `image_threads`
        # threads: 64 concurrent uploads decoded at once would starve the engine of the cores.
        return await anyio.to_thread.run_sync(fn, limiter=self._image_limiter)

    async def _run(self, operation: str, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        batcher = self._require_engine()[1]
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

    async def encode(
        self, uploads: Sequence[bytes], policy: ResizePolicy, fmt: TokenFormat
    ) -> dict[str, Any]:
        engine, _, geometry = self._require_engine()
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
        admitted = admit_uploads(uploads, policy=policy, model=geometry, limits=self.limits)
        async with self.budget.reserve(admitted.cost_bytes):
            prepared = await self._image_work(
                lambda: prepare_uploads(admitted, policy=policy, model=geometry)
            )
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

    async def decode(self, request: DecodeRequest) -> Decoded:
        engine, _, geometry = self._require_engine()
        info = engine.info
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
        tokens, single, field = tokens_from_request(request)
        cost = admit_token_grids(tokens.shape, model=geometry, limits=self.limits, field=field)
        check_codes(tokens, int(info.codebook_size), field, single)
        f = geometry.downsample
        full = (tokens.shape[1] * f, tokens.shape[2] * f)
        sizes = crop_sizes(request.original_size, len(tokens), full)
        async with self.budget.reserve(cost):
            images = await self._run("decode", list(tokens))

            def to_pngs() -> list[bytes]:
                return [encode_png(image, crop_to=size) for image, size in zip(images, sizes)]

            return Decoded(await self._image_work(to_pngs), sizes, single)

    async def reconstruct(self, upload: bytes, policy: ResizePolicy) -> Reconstruction:
        _, _, geometry = self._require_engine()
        admitted = admit_uploads(
            [upload], policy=policy, model=geometry, limits=self.limits, field="image"
        )
        async with self.budget.reserve(admitted.cost_bytes):
            (image,) = await self._image_work(
                lambda: prepare_uploads(admitted, policy=policy, model=geometry)
            )
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
