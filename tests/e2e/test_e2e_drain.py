"""SIGTERM on a real vqtok-serve with keep-alive clients: the pre-stop delay keeps the port open
while /health/ready says 503, every request sent gets its whole answer, and the exit status is 0.
(benchmarks/drain.py measures the same at 16 and 64 clients.)"""

from __future__ import annotations

import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from e2e_support import Server, png, start_server

from service.drain import hold_off_new_connections

PRE_STOP_DELAY_S = 2.0


@dataclass
class Counts:
    sent: int = 0
    answered: int = 0  # whole answers, any status
    answered_200: int = 0
    answered_closing: int = 0  # answers that carried `Connection: close`
    not_connected: int = 0  # refused or held off: nothing was sent, safe to retry
    lost: int = 0  # sent, then no complete answer
    last_error: str = ""


def keep_alive_client(base_url: str, image: bytes, stop: threading.Event, counts: Counts) -> None:
    """One closed-loop client on its own keep-alive connection, alternating GET and POST."""
    files = [("images", ("i.png", image, "image/png"))]
    with httpx.Client(base_url=base_url, timeout=30) as client:
        for turn in range(1_000_000):
            if stop.is_set():
                return
            try:
                if turn % 2:
                    response = client.post("/v1/encode", files=files)
                else:
                    response = client.get("/v1/model")
            except (httpx.ConnectError, httpx.ConnectTimeout):
                counts.not_connected += 1
                time.sleep(0.02)
                continue
            except httpx.TransportError as error:  # reset, EOF or timeout after sending
                counts.sent += 1
                counts.lost += 1
                counts.last_error = repr(error)
                continue
            counts.sent += 1
            counts.answered += 1
            counts.answered_200 += response.status_code == 200
            counts.answered_closing += response.headers.get("connection") == "close"


def sigterm_under_load(server: Server, clients: int) -> tuple[list[Counts], httpx.Response]:
    """SIGTERM with `clients` running; returns their counts and a /v1/model answer taken during
    the pre-stop delay, after checking /health/ready is 503 by then."""
    image = png(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    stop = threading.Event()
    counts = [Counts() for _ in range(clients)]
    threads = [
        threading.Thread(target=keep_alive_client, args=(server.base_url, image, stop, c))
        for c in counts
    ]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)
        server.process.terminate()
        time.sleep(0.3)
        ready = httpx.get(server.base_url + "/health/ready", timeout=10)
        assert ready.status_code == 503 and "draining" in ready.json()["detail"]
        during_delay = httpx.get(server.base_url + "/v1/model", timeout=10)
        server.process.wait(timeout=PRE_STOP_DELAY_S + 20)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=40)
    return counts, during_delay


def test_sigterm_drains_keep_alive_clients_without_losing_a_request(e2e_model_dir: Path) -> None:
    server = start_server(e2e_model_dir, env={"VQTOK_PRE_STOP_DELAY_S": str(PRE_STOP_DELAY_S)})
    started = time.monotonic()
    try:
        counts, during_delay = sigterm_under_load(server, clients=8)
    finally:
        server.stop()
    took = time.monotonic() - started
    # /health/ready already said 503, yet the port still serves, asking clients to reconnect
    assert during_delay.status_code == 200 and during_delay.headers["connection"] == "close"
    assert during_delay.json()["id"]
    lost = sum(c.lost for c in counts)
    assert lost == 0, [c.last_error for c in counts if c.lost]
    assert all(c.answered for c in counts)
    assert sum(c.answered_200 for c in counts) == sum(c.answered for c in counts)
    assert sum(c.answered_closing for c in counts) >= len(counts)  # kept serving while draining
    assert sum(c.not_connected for c in counts) > 0  # ...and then the port did close
    assert took >= PRE_STOP_DELAY_S
    assert server.process.returncode == 0, server.log()[-3000:]
    assert "Finished server process" in server.log()


def test_a_second_sigterm_skips_the_pre_stop_delay(e2e_model_dir: Path) -> None:
    server = start_server(e2e_model_dir, env={"VQTOK_PRE_STOP_DELAY_S": "60"})
    try:
        server.process.terminate()
        deadline = time.monotonic() + 10
        while httpx.get(server.base_url + "/health/ready", timeout=5).status_code != 503:
            assert time.monotonic() < deadline, "never started draining"
            time.sleep(0.05)
        server.process.terminate()
        started = time.monotonic()
        code = server.process.wait(timeout=15)
        took = time.monotonic() - started
    finally:
        server.stop()
    assert code == 0, server.log()[-3000:]
    assert took < 10  # not the 60 s delay


@pytest.mark.skipif(sys.platform != "linux", reason="socket filters are Linux's")
def test_held_off_listener_keeps_its_queue_and_takes_no_new_connection() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        address = listener.getsockname()
        with socket.create_connection(address) as queued:
            queued.sendall(b"sent before the hold-off")
            assert hold_off_new_connections(listener)
            with pytest.raises(TimeoutError):  # SYN dropped: no handshake, nothing sent
                socket.create_connection(address, timeout=0.3)
            accepted, _ = listener.accept()
            with accepted:
                assert accepted.recv(100) == b"sent before the hold-off"
                accepted.sendall(b"answer")
                assert queued.recv(100) == b"answer"
