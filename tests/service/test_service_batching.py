"""MicroBatcher: grouping, bounds, routing of results, failure isolation, draining."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from service.batching import BatcherClosed, MicroBatcher, QueueFull

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Recorder:
    """A batch function that doubles its input and remembers every batch it saw."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, ...]] = []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.gate.wait(timeout=30)
        self.batches.append(batch.shape)
        if (batch < 0).any():
            raise ValueError("negative input in this batch")
        return batch * 2


def make(fn: Recorder, **kwargs: float) -> MicroBatcher:
    options = {"max_batch": 8, "max_wait_ms": 50.0, "max_queue": 64} | kwargs
    batcher = MicroBatcher({"double": fn}, **options)  # type: ignore[arg-type]
    batcher.start()
    return batcher


async def test_concurrent_same_shape_requests_share_one_call_and_get_their_own_results() -> None:
    fn = Recorder()
    batcher = make(fn)
    arrays = [np.full((2, 3), i, dtype=np.int64) for i in range(8)]
    results = await asyncio.gather(*(batcher.submit("double", [a]) for a in arrays))
    assert fn.batches == [(8, 2, 3)]
    for i, (result,) in enumerate(results):
        np.testing.assert_array_equal(result, np.full((2, 3), 2 * i))
    assert await batcher.aclose(timeout=5)


async def test_batches_are_bounded_by_max_batch_and_split_by_shape() -> None:
    fn = Recorder()
    batcher = make(fn, max_batch=3)
    small = [np.ones((2, 2)) for _ in range(5)]
    large = [np.ones((4, 4)) for _ in range(2)]
    await asyncio.gather(*(batcher.submit("double", [a]) for a in small + large))
    assert sorted(fn.batches) == [(2, 2, 2), (2, 4, 4), (3, 2, 2)]
    await batcher.aclose(timeout=5)


async def test_a_lone_request_waits_at_most_max_wait() -> None:
    fn = Recorder()
    batcher = make(fn, max_batch=64, max_wait_ms=10.0)
    (result,) = await asyncio.wait_for(batcher.submit("double", [np.ones(3)]), timeout=5)
    np.testing.assert_array_equal(result, [2, 2, 2])
    await batcher.aclose(timeout=5)


async def test_a_failing_batch_fails_only_its_own_requests() -> None:
    fn = Recorder()
    batcher = make(fn, max_batch=8)
    # Same shape would share a batch with the bad item: use a different shape for the good ones.
    bad = batcher.submit("double", [-np.ones((1, 1))])
    good = [batcher.submit("double", [np.full((2, 2), i)]) for i in range(3)]
    results = await asyncio.gather(bad, *good, return_exceptions=True)
    assert isinstance(results[0], ValueError)
    for i, result in enumerate(results[1:]):
        np.testing.assert_array_equal(result[0], np.full((2, 2), 2 * i))
    # The worker survives the failure.
    (after,) = await batcher.submit("double", [np.ones(2)])
    np.testing.assert_array_equal(after, [2, 2])
    await batcher.aclose(timeout=5)


async def test_full_queue_refuses_whole_requests_then_recovers() -> None:
    fn = Recorder()
    fn.gate.clear()  # the engine is stuck: items pile up
    batcher = make(fn, max_batch=1, max_wait_ms=0.0, max_queue=3)
    first = asyncio.ensure_future(batcher.submit("double", [np.ones(1)]))
    await asyncio.sleep(0.1)  # taken by the worker, blocked inside fn
    waiting = asyncio.ensure_future(batcher.submit("double", [np.ones(1), np.ones(1)]))
    await asyncio.sleep(0.05)
    assert batcher.queue_depth == 2
    with pytest.raises(QueueFull) as caught:
        await batcher.submit("double", [np.ones(1), np.ones(1)])  # 2 + 2 > 3: none admitted
    assert (caught.value.queued, caught.value.requested, caught.value.limit) == (2, 2, 3)
    assert batcher.queue_depth == 2
    fn.gate.set()
    assert len(await first) == 1 and len(await waiting) == 2
    assert len(await batcher.submit("double", [np.ones(1)] * 3)) == 3
    await batcher.aclose(timeout=5)


async def test_close_drains_accepted_work_and_refuses_new_work() -> None:
    fn = Recorder()
    fn.gate.clear()
    batcher = make(fn, max_batch=2, max_wait_ms=1000.0)
    pending = [asyncio.ensure_future(batcher.submit("double", [np.full(1, i)])) for i in range(5)]
    await asyncio.sleep(0.05)
    batcher.close()
    with pytest.raises(BatcherClosed):
        await batcher.submit("double", [np.ones(1)])
    fn.gate.set()
    assert await batcher.aclose(timeout=5)
    results = await asyncio.gather(*pending)
    assert [int(result[0][0]) for result in results] == [0, 2, 4, 6, 8]


async def test_cancelled_callers_are_skipped() -> None:
    fn = Recorder()
    fn.gate.clear()
    batcher = make(fn, max_batch=1, max_wait_ms=0.0)
    blocker = asyncio.ensure_future(batcher.submit("double", [np.ones(1)]))
    await asyncio.sleep(0.05)
    gone = asyncio.ensure_future(batcher.submit("double", [np.full(1, 7)]))
    await asyncio.sleep(0.01)
    gone.cancel()
    await asyncio.sleep(0.01)
    fn.gate.set()
    await blocker
    await batcher.aclose(timeout=5)
    assert fn.batches == [(1, 1)]  # the cancelled item never reached the engine


async def test_a_batch_is_counted_before_its_callers_see_their_results() -> None:
    # A client that reads /metrics right after its response must find the batch that served it.
    loop = asyncio.get_running_loop()
    answered: list[np.ndarray] = []
    answered_when_counted: list[bool] = []

    async def caller_has_answer() -> bool:
        # Results already handed back reach their caller within a few loop turns (FIFO).
        for _ in range(20):
            await asyncio.sleep(0)
        return bool(answered)

    def observer(operation: str, size: int, seconds: float) -> None:
        probe = asyncio.run_coroutine_threadsafe(caller_has_answer(), loop)
        answered_when_counted.append(probe.result(timeout=30))

    batcher = MicroBatcher(
        {"double": Recorder()}, max_batch=8, max_wait_ms=50.0, max_queue=64, on_batch=observer
    )
    batcher.start()
    answered.extend(await batcher.submit("double", [np.ones(2), np.zeros(2)]))  # one batch
    assert answered_when_counted == [False]
    await batcher.aclose(timeout=5)
