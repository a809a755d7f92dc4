"""Draining without losing requests: every response sent while draining closes its connection.

A keep-alive client reuses its connection for the next request. If the server closes that
connection while the request is on the wire, the client gets a reset and no answer. While the
service drains (SIGTERM → pre-stop delay → listener closes), each response therefore carries
`Connection: close`: the client opens a new connection for its next request, which the listener
still accepts during the pre-stop delay, or which is refused (never half-sent) after it.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send


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
