"""The router's HTTP server: uvicorn (httptools, uvloop) with the limits a client-facing edge needs.

uvicorn's httptools protocol waits as long as a client likes for a request to arrive and reads a
request head of any size, so a slow or endless client could hold connections and memory. Here a
request must arrive whole (head and body) within ``router.request_read_timeout_s`` of its first
byte (a new connection: of its opening), and its head (request line and headers) may take at most
``router.max_header_bytes``. Past either the client gets an OpenAI-format 408 or 431 and the
connection closes. A request uvicorn cannot parse gets an OpenAI-format 400 instead of plain text.

A request that arrives in one read, the usual case, starts no timer at all: the timer is only armed
when a read ends with a request still incomplete. The idle time between requests on a kept-alive
connection is uvicorn's keep-alive timeout, not this one.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from router.errors import HeadersTooLarge, InvalidRequest, OpenWeightError, RequestTimeout
from router.settings import RouterConfig

if TYPE_CHECKING:
    from router.app import RouterApp

_LINGER_S = 2.0
"""How long a connection answered outside a request (400, 408, 431) still reads before it closes."""

READ_TIMED_OUT = "openweight.read_timed_out"
"""Set in a request's ASGI scope when its body did not arrive in time: the app answers 408."""


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a read timeout per request and a limit on its head.

    Configure it with :func:`guarded_protocol`; the limits are class attributes because uvicorn
    builds one protocol per connection from the class.
    """

    read_timeout_s: float = 30.0
    max_header_bytes: int = 64 * 1024
    refused: Callable[[int], None] | None = None
    """Told the status of each answer the protocol gives itself (400, 408, 431): for metrics."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reading = True  # a request is being read, or awaited on a new connection
        self._in_head = True
        self._head_bytes = 0
        self._timer: asyncio.TimerHandle | None = None
        self._discarding = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            return
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        if self.transport.is_closing():
            return  # answered already (a malformed request)
        if self._in_head and self._head_bytes > self.max_header_bytes:
            self._refuse(HeadersTooLarge(
                f"the request line and headers exceed the limit of {self.max_header_bytes} bytes"
            ))
        elif self._reading and self._timer is None:
            self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._reading = True

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._reading, self._in_head, self._head_bytes = False, True, 0
        self._disarm()
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes that are not an HTTP/1.1 request, in OpenAI format."""
        self._answer(InvalidRequest("the request is not valid HTTP/1.1"))

    def _arm(self) -> None:
        self._timer = self.loop.call_later(self.read_timeout_s, self._read_timed_out)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _read_timed_out(self) -> None:
        self._timer = None
        if not self._reading or self.transport.is_closing():
            return
        cycle = self.cycle
        if not self._in_head and cycle is not None and not cycle.response_complete:
            # Its body is late: the app answers 408 when it reads on, then the connection closes.
            cycle.keep_alive = False
            cycle.scope[READ_TIMED_OUT] = True  # type: ignore[literal-required]
            cycle.message_event.set()
        elif not self._in_head or not self._head_bytes:
            # Answered before its body was read, or a connection that never sent a byte: just close.
            self.transport.close()
        else:
            self._refuse(RequestTimeout(f"the request did not arrive within {self.read_timeout_s:g} s"))

    def _refuse(self, error: OpenWeightError) -> None:
        """Answer `error` for a request whose head never completed, then close the connection."""
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # The request before it (pipelined) is still being answered: let it finish, read no
            # more, then close.
            cycle.keep_alive = False
            self.flow.pause_reading()
            return
        self._answer(error)

    def _answer(self, error: OpenWeightError) -> None:
        """Write `error` as a whole response outside any request cycle, then close the connection."""
        body = error.body()
        head = (
            f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
        )
        self._disarm()
        self.transport.write(head.encode() + body)
        if self.refused is not None:
            self.refused(error.status)
        # Closing with unread bytes from the client would reset the connection, and its receive
        # buffer (this answer) with it: end our side, discard what still comes for a moment, then close.
        self._discarding = True
        self.transport.write_eof()
        self.loop.call_later(_LINGER_S, self.transport.close)


def guarded_protocol(
    config: RouterConfig, refused: Callable[[int], None] | None = None
) -> type[GuardedHttpToolsProtocol]:
    """The protocol class with `config`'s read timeout and head limit; `refused` is told the status
    of every answer it gives itself."""
    attributes = {
        "read_timeout_s": config.request_read_timeout_s,
        "max_header_bytes": config.max_header_bytes,
        "refused": staticmethod(refused) if refused is not None else None,
    }
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), attributes)


def server_config(app: RouterApp, config: RouterConfig, **overrides: Any) -> uvicorn.Config:
    """The uvicorn configuration the router runs with (`overrides`: e.g. another port in tests)."""
    options: dict[str, Any] = {
        "host": config.host,
        "port": config.port,
        "loop": "uvloop",
        "http": guarded_protocol(config, app.endpoints.metrics.refused),
        "lifespan": "on",
        "access_log": False,
        "server_header": False,
        "proxy_headers": False,
        # Whole seconds, at least the grace period.
        "timeout_graceful_shutdown": math.ceil(config.shutdown_grace_s),
        "ws": "none",  # no WebSocket route exists: an Upgrade request is served as plain HTTP
        "timeout_keep_alive": 30,
        "log_level": "info",
    }
    return uvicorn.Config(app, **{**options, **overrides})
