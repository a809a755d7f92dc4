"""A real vqtok-serve under pressure: a full queue answers 503 + Retry-After and recovers; an API
key guards /v1; SIGTERM while requests wait in the queue still answers every one of them."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from e2e_support import Server, png, start_server

TIMEOUT = httpx.Timeout(60.0)
KEY = {"x-api-key": "e2e-key"}


def upload(data: bytes) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", ("i.png", data, "image/png"))]


def small_images(count: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    return [png(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(count)]


async def wait_for_queue(server: Server, depth: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while queue_depth(server) < depth:
        if time.monotonic() > deadline:
            raise AssertionError(f"queue never reached {depth}:\n{server.log()[-3000:]}")
        await asyncio.sleep(0.02)


def queue_depth(server: Server) -> float:
    for line in httpx.get(server.base_url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("vqtok_queue_depth "):
            return float(line.split()[1])
    return 0.0


@pytest.fixture
def slow_batching_server(e2e_model_dir: Path) -> Server:
    # Long max_wait: accepted images sit in the queue ~3 s, long enough to act on them.
    server = start_server(
        e2e_model_dir,
        env={
            "VQTOK_MAX_BATCH": "64",
            "VQTOK_MAX_WAIT_MS": "3000",
            "VQTOK_MAX_QUEUE": "4",
            "VQTOK_MAX_IMAGES": "4",
            "VQTOK_API_KEY": "e2e-key",
            # shorter than the queue wait: the port closes while the accepted images still wait
            "VQTOK_PRE_STOP_DELAY_S": "0.5",
        },
    )
    yield server
    server.stop()


def test_api_key_full_queue_503_and_recovery(slow_batching_server: Server) -> None:
    server = slow_batching_server
    images = small_images(10)

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=TIMEOUT) as client:
            missing = await client.post("/v1/encode", files=upload(images[0]))
            assert missing.status_code == 401 and "API key" in missing.json()["detail"]
            first = [
                asyncio.ensure_future(client.post("/v1/encode", files=upload(i), headers=KEY))
                for i in images[:4]
            ]
            await wait_for_queue(server, 4)  # all four accepted and waiting for company
            late = await asyncio.gather(
                *(client.post("/v1/encode", files=upload(i), headers=KEY) for i in images[4:])
            )
            ready = await client.get("/health/ready")
            assert ready.status_code == 200  # overloaded is not unhealthy
            return [*(await asyncio.gather(*first)), *late]

    answers = asyncio.run(burst())
    assert [a.status_code for a in answers] == [200] * 4 + [503] * 6
    for refused in answers[4:]:
        assert refused.headers["retry-after"] == "1"
        body = refused.json()
        assert body["limit"] == 4 and "capacity" in body["detail"]
    again = httpx.post(
        server.base_url + "/v1/encode", files=upload(images[5]), headers=KEY, timeout=TIMEOUT
    )
    assert again.status_code == 200  # recovered once the queue drained
    metrics = httpx.get(server.base_url + "/metrics").text
    assert "vqtok_queue_rejected_images_total 6.0" in metrics


def test_sigterm_under_load_answers_every_accepted_request(slow_batching_server: Server) -> None:
    server = slow_batching_server
    images = small_images(4)

    async def run() -> tuple[list[httpx.Response], BaseException | httpx.Response]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=TIMEOUT) as client:
            accepted = [
                asyncio.ensure_future(client.post("/v1/encode", files=upload(i), headers=KEY))
                for i in images
            ]
            await wait_for_queue(server, len(images))
            server.process.terminate()  # SIGTERM while all four wait in the queue
            await asyncio.sleep(0.3)
            try:
                late: BaseException | httpx.Response = await client.get("/health/ready")
            except httpx.TransportError as error:
                late = error
            return list(await asyncio.gather(*accepted)), late

    answers, late = asyncio.run(run())
    assert [a.status_code for a in answers] == [200] * len(images)
    assert all(len(a.json()["items"]) == 1 for a in answers)
    # After SIGTERM nothing new gets in: the service says it is draining (during the pre-stop
    # delay), or on a slow machine the port has already closed.
    assert isinstance(late, httpx.TransportError) or late.status_code == 503
    assert server.process.wait(timeout=30) == 0  # a clean drain, not "killed by SIGTERM"
    log = server.log()
    assert "draining" in log and "Finished server process" in log
