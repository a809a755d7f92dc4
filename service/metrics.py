"""Prometheus metrics of one app instance (its own registry, so many apps can live in a process).

HTTP: request counts and latency per route template, method and status, requests in flight.
Batching: batch size and engine seconds per operation, queue depth.
Codebook health of the traffic actually served: distinct codes seen and the usage entropy in
bits (log2 K is the ceiling; a collapsed codebook shows up here before users notice).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class CodeUsage(Collector):
    """Counts of every code index the encoder has returned since start."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: np.ndarray | None = None

    def reset(self, codebook_size: int) -> None:
        with self._lock:
            self._counts = np.zeros(codebook_size, dtype=np.int64)

    def observe(self, tokens: np.ndarray) -> None:
        with self._lock:
            if self._counts is None:
                return
            flat = np.asarray(tokens).reshape(-1)
            self._counts += np.bincount(flat, minlength=len(self._counts))[: len(self._counts)]

    def distinct_and_entropy(self) -> tuple[int, float]:
        with self._lock:
            counts = None if self._counts is None else self._counts.copy()
        if counts is None or counts.sum() == 0:
            return 0, 0.0
        p = counts[counts > 0] / counts.sum()
        # H = -Σ p log2 p; 0 for one code, log2 K for perfectly uniform use.
        return len(p), float(-(p * np.log2(p)).sum() + 0.0)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        distinct, entropy = self.distinct_and_entropy()
        size = 0 if self._counts is None else len(self._counts)
        yield GaugeMetricFamily(
            "vqtok_codebook_distinct_codes", "distinct codes in served encode traffic", distinct
        )
        yield GaugeMetricFamily(
            "vqtok_codebook_usage_entropy_bits",
            "entropy of served code usage, bits (max log2 codebook size)",
            entropy,
        )
        yield GaugeMetricFamily("vqtok_codebook_size", "codes in the served model's codebook", size)
        yield GaugeMetricFamily(
            "vqtok_codebook_max_entropy_bits",
            "log2 of the codebook size",
            math.log2(size) if size else 0.0,
        )


class ServiceMetrics:
    """All metrics of one app; `render()` is what GET /metrics answers."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "vqtok_http_requests",
            "HTTP requests answered",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "vqtok_http_request_duration_seconds",
            "HTTP request latency",
            ["route", "method", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("vqtok_http_requests_in_flight", "requests being served", registry=r)
        self.batch_size = Histogram(
            "vqtok_batch_size",
            "images per engine call",
            ["operation"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.engine_seconds = Histogram(
            "vqtok_engine_seconds",
            "engine time per batched call",
            ["operation"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "vqtok_queue_depth", "images accepted and waiting for the engine", registry=r
        )
        self.rejected = Counter(
            "vqtok_queue_rejected_images",
            "images refused because the queue was full",
            registry=r,
        )
        self.tokens = Counter("vqtok_tokens_encoded", "token indices returned", registry=r)
        self.code_usage = CodeUsage()
        r.register(self.code_usage)

    def track_queue(self, depth: Callable[[], int]) -> None:
        self.queue_depth.set_function(lambda: float(depth()))

    def observe_batch(self, operation: str, size: int, seconds: float) -> None:
        self.batch_size.labels(operation).observe(size)
        self.engine_seconds.labels(operation).observe(seconds)

    def observe_tokens(self, tokens: np.ndarray) -> None:
        self.tokens.inc(int(np.asarray(tokens).size))
        self.code_usage.observe(tokens)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class HTTPMetricsMiddleware:
    """Pure ASGI: counts and times every HTTP request by route template and final status."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics, known_paths: Callable[[], set[str]]):
        self.app = app
        self.metrics = metrics
        self.known_paths = known_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_and_record)
        finally:
            self.metrics.in_flight.dec()
            route = scope.get("route")
            path = getattr(route, "path", None) or scope["path"]
            if path not in self.known_paths():
                path = "unmatched"  # keep label cardinality bounded
            labels = (path, scope["method"], str(status))
            self.metrics.requests.labels(*labels).inc()
            self.metrics.latency.labels(*labels).observe(time.perf_counter() - started)
