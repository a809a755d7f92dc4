"""Micro-batching: concurrent requests share one engine call, on one worker thread.

    batcher = MicroBatcher({"encode": engine.encode, "decode": engine.decode}, max_batch=16,
                           max_wait_ms=2, max_queue=256)
    batcher.start()
    tokens = await batcher.submit("encode", [image_chw])      # -> [array [h, w]]
    await batcher.aclose()                                     # drains what was accepted

Items wait in one queue per (operation, item shape): only same-shape items can be stacked. The
worker always serves the group holding the oldest item, waiting at most `max_wait_ms` from that
item's arrival for the group to reach `max_batch`. A request is admitted whole or refused whole
(`QueueFull`) so a multi-image request never half-runs. A batch that raises fails only the
requests in it; results are routed back by position, so callers never see each other's data.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

BatchFn = Callable[[np.ndarray], np.ndarray]
BatchObserver = Callable[[str, int, float], None]  # (operation, batch size, engine seconds)


class QueueFull(RuntimeError):
    """The queue cannot take the request now; retry later."""

    def __init__(self, queued: int, requested: int, limit: int) -> None:
        super().__init__(
            f"queue holds {queued} images, the request adds {requested}, the limit is {limit}"
        )
        self.queued, self.requested, self.limit = queued, requested, limit


class BatcherClosed(RuntimeError):
    """The batcher is draining or stopped and takes no new work."""


@dataclass
class _Item:
    array: np.ndarray
    future: asyncio.Future[np.ndarray]
    loop: asyncio.AbstractEventLoop
    enqueued: float = field(default_factory=time.monotonic)


class MicroBatcher:
    """Groups same-shape items from concurrent callers into batched calls of `functions[op]`."""

    def __init__(
        self,
        functions: Mapping[str, BatchFn],
        *,
        max_batch: int,
        max_wait_ms: float,
        max_queue: int,
        on_batch: BatchObserver | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError(
                f"need max_batch >= 1, max_queue >= 1, max_wait_ms >= 0; "
                f"got {max_batch}, {max_queue}, {max_wait_ms}"
            )
        self._functions = dict(functions)
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self._on_batch = on_batch
        self._groups: dict[tuple[str, tuple[int, ...]], deque[_Item]] = {}
        self._queued = 0
        self._cond = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None

    @property
    def queue_depth(self) -> int:
        """Items accepted and not yet handed to the engine."""
        return self._queued

    @property
    def accepting(self) -> bool:
        return self._thread is not None and not self._closing

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("MicroBatcher already started")
        self._thread = threading.Thread(target=self._run, name="vqtok-batcher", daemon=True)
        self._thread.start()

    async def submit(self, operation: str, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Queue every array of one request (admitted together) and await their results."""
        if operation not in self._functions:
            raise KeyError(f"unknown operation {operation!r}; known: {sorted(self._functions)}")
        loop = asyncio.get_running_loop()
        items = [_Item(np.asarray(array), loop.create_future(), loop) for array in arrays]
        with self._cond:
            if not self.accepting:
                raise BatcherClosed("the service is shutting down and takes no new work")
            if self._queued + len(items) > self.max_queue:
                raise QueueFull(self._queued, len(items), self.max_queue)
            for item in items:
                key = (operation, tuple(item.array.shape))
                self._groups.setdefault(key, deque()).append(item)
            self._queued += len(items)
            self._cond.notify()
        try:
            return list(await asyncio.gather(*(item.future for item in items)))
        except BaseException:
            # Caller gone (client disconnect) or a batch failed: the worker skips the rest.
            for item in items:
                if item.future.done() and not item.future.cancelled():
                    item.future.exception()  # mark retrieved: one failure is reported once
                item.future.cancel()
            raise

    def close(self) -> None:
        """Take no new work; the worker finishes everything already accepted, then exits."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()

    async def aclose(self, timeout: float | None = None) -> bool:
        """close() and wait for the drain; True when the worker finished within `timeout`."""
        self.close()
        thread = self._thread
        if thread is None:
            return True
        await asyncio.get_running_loop().run_in_executor(None, thread.join, timeout)
        return not thread.is_alive()

    # -- worker thread ----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            operation, items = batch
            self._execute(operation, items)

    def _next_batch(self) -> tuple[str, list[_Item]] | None:
        with self._cond:
            while True:
                self._drop_cancelled()
                if not self._groups:
                    if self._closing:
                        return None
                    self._cond.wait()
                    continue
                key = min(self._groups, key=lambda k: self._groups[k][0].enqueued)
                group = self._groups[key]
                deadline = group[0].enqueued + self.max_wait
                remaining = deadline - time.monotonic()
                if len(group) >= self.max_batch or remaining <= 0 or self._closing:
                    break
                self._cond.wait(remaining)
            items = [group.popleft() for _ in range(min(self.max_batch, len(group)))]
            if not group:
                del self._groups[key]
            self._queued -= len(items)
            return key[0], items

    def _drop_cancelled(self) -> None:
        for key in list(self._groups):
            group = self._groups[key]
            kept = deque(item for item in group if not item.future.cancelled())
            self._queued -= len(group) - len(kept)
            if kept:
                self._groups[key] = kept
            else:
                del self._groups[key]

    def _execute(self, operation: str, items: list[_Item]) -> None:
        started = time.perf_counter()
        try:
            outputs = self._functions[operation](np.stack([item.array for item in items]))
            if len(outputs) != len(items):
                raise RuntimeError(
                    f"{operation} returned {len(outputs)} results for a batch of {len(items)}"
                )
        except Exception as error:  # fail only this batch's requests
            for item in items:
                _hand_back(item, None, error)
            return
        elapsed = time.perf_counter() - started
        # Count the batch before any caller can see its answer: a client that reads /metrics
        # right after its response must find the batch that served it.
        if self._on_batch is not None:
            with contextlib.suppress(Exception):  # metrics must never stop the worker
                self._on_batch(operation, len(items), elapsed)
        for index, item in enumerate(items):
            _hand_back(item, outputs[index], None)


def _hand_back(item: _Item, value: np.ndarray | None, error: BaseException | None) -> None:
    # RuntimeError: the caller's event loop is closed, nobody is waiting.
    with contextlib.suppress(RuntimeError):
        item.loop.call_soon_threadsafe(_resolve, item.future, value, error)


def _resolve(
    future: asyncio.Future[np.ndarray], value: np.ndarray | None, error: BaseException | None
) -> None:
    if future.done():  # cancelled by a departed caller
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)
