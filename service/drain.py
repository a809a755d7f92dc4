"""Draining without losing a request: SIGTERM → pre-stop delay → listener closes → exit 0.

Three ways a keep-alive client loses a request at shutdown, and what closes each:
- it reuses a connection the server is about to close: while draining every response carries
  `Connection: close` (`CloseConnectionsWhileDraining`), so the next request opens a new one,
  which the listener still accepts during the pre-stop delay, or refuses (never half-sent) after;
- closing a listening socket resets connections still in its accept queue: new handshakes are
  held off first and the queue is accepted before the close (`hold_off_new_connections`);
- uvicorn closes idle connections at once, though a request may already sit unread in the socket
  (`ReadBeforeClose`).
`DrainingServer` runs the sequence: /health/ready 503 at once, the port open for the pre-stop
delay (a load balancer sees the 503 and stops routing), then uvicorn's graceful shutdown.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import socket
import struct
import sys
import time
from collections.abc import Callable
from types import FrameType

import uvicorn
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.auto import AutoHTTPProtocol

log = logging.getLogger("vqtok.service")


class CloseConnectionsWhileDraining:
    """Pure ASGI middleware: `Connection: close` on every HTTP response once `draining()`."""

    def __init__(self, app: ASGIApp, draining: Callable[[], bool]) -> None:
        self.app = app
        self.draining = draining

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_closing(message: Message) -> None:
            if message["type"] == "http.response.start" and self.draining():
                MutableHeaders(scope=message)["connection"] = "close"
            await send(message)

        await self.app(scope, receive, send_closing)


# How long a connection with no request in progress stays open after the port closes. uvicorn
# closes such connections at once, but a client that has just connected (or reused a keep-alive
# connection) may already have sent its request, unread by the event loop: closing would reset it.
IDLE_READ_GRACE_S = 0.5


class ReadBeforeClose(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
    """uvicorn's HTTP/1.1 protocol; at shutdown an idle connection first reads what is in flight."""

    def shutdown(self) -> None:
        if self.cycle is None or self.cycle.response_complete:
            self.loop.call_later(IDLE_READ_GRACE_S, self._shutdown_now)
        else:  # a request in progress: uvicorn closes the connection after its response
            super().shutdown()

    def _shutdown_now(self) -> None:
        if not self.transport.is_closing():
            super().shutdown()  # still idle: close; a request arrived meanwhile: close after it


# Closing a listening socket resets every connection still in its accept queue, along with the
# request a client has already sent on it. So first stop new handshakes, let the event loop
# accept what is queued, then close. Classic BPF on the listener, run on each packet's TCP header:
# drop a bare SYN (a new connection; the client retries it in ~1 s and by then finds the port
# closed: "connection refused", nothing sent), keep everything else, such as the ACK that
# completes a handshake already under way.
_DROP_NEW_SYN = [  # (code, jump if true, jump if false, k)
    (0x30, 0, 0, 13),  # A = TCP flags byte
    (0x54, 0, 0, 0x12),  # A &= SYN | ACK
    (0x15, 0, 1, 0x02),  # A == SYN (no ACK)?
    (0x06, 0, 0, 0),  # yes: drop
    (0x06, 0, 0, 0xFFFFFFFF),  # no: keep
]
_SO_ATTACH_FILTER = getattr(socket, "SO_ATTACH_FILTER", 26)  # Linux's value
ACCEPT_QUEUE_DRAIN_S = 0.1  # several event-loop turns: the queue is accepted in one


def hold_off_new_connections(listener: socket.socket) -> bool:
    """Drop new connection attempts (bare SYNs) to a listening socket, from now until it closes;
    handshakes already under way complete and queue as usual. Linux; False elsewhere."""
    if sys.platform != "linux":
        return False
    program = ctypes.create_string_buffer(
        b"".join(struct.pack("HBBI", *op) for op in _DROP_NEW_SYN)
    )
    sock_fprog = struct.pack("HP", len(_DROP_NEW_SYN), ctypes.addressof(program))
    try:
        listener.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, sock_fprog)
    except OSError as error:
        log.warning("cannot hold off new connections before the port closes: %s", error)
        return False
    return True


class DrainingServer(uvicorn.Server):
    """uvicorn, plus a pre-stop delay between "not ready" and "port closed".

    First SIGTERM/SIGINT: `begin_drain()` (/health/ready → 503, responses close their connection)
    and keep serving for `pre_stop_delay_s`, then uvicorn's graceful shutdown. A signal during the
    delay starts that shutdown at once; a signal during the shutdown stops waiting for requests.
    """

    def __init__(
        self, config: uvicorn.Config, begin_drain: Callable[[], None], pre_stop_delay_s: float
    ) -> None:
        super().__init__(config)
        self._begin_drain = begin_drain
        self._pre_stop_delay_s = pre_stop_delay_s
        self._shutdown_at: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._shutdown_at is None:
            self._begin_drain()
            # before the port opened nobody can be routed here: nothing to wait for
            delay = self._pre_stop_delay_s if self.started else 0.0
            self._shutdown_at = time.monotonic() + delay
            log.info(
                "pre-stop delay: the port closes in %.1f s (signal again to close it now)", delay
            )
            # not passed to uvicorn: it would re-raise the signal after a clean shutdown (exit 143)
        elif not self.should_exit:
            self.should_exit = True
        else:
            super().handle_exit(sig, frame)  # re-raised at exit: the drain was cut short
            self.force_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self._shutdown_at is not None and time.monotonic() >= self._shutdown_at:
            self.should_exit = True
        return await super().on_tick(counter)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        listeners = [sock for server in self.servers for sock in server.sockets]
        held_off = [hold_off_new_connections(sock) for sock in listeners]
        if any(held_off) and not self.force_exit:
            await asyncio.sleep(ACCEPT_QUEUE_DRAIN_S)  # accept the queue before closing it
        await super().shutdown(sockets)
