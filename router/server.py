"""The router's HTTP server: uvicorn (httptools, uvloop) with the limits a client-facing edge needs.

uvicorn's httptools protocol waits as long as a client likes for a request to arrive and reads a
request head of any size, so a slow or endless client could hold connections and memory. Here a
request must arrive whole (head and body) within ``router.request_read_timeout_s`` of its first
byte (a new connection: of its opening), and its head (request line and headers) may take at most
``router.max_header_bytes``. Past either the client gets an OpenAI-format 408 or 431 and the
connection closes. The whole request is bounded too (body with its framing, and trailers, which
are not kept): the app refuses a large body itself (413), this bounds what it never sees. Bytes
that are not HTTP/1.1 get an OpenAI-format 400 instead of plain text.
When the app is already reading the request (its body is late or malformed), the app answers, so
the request is counted like any other; otherwise the protocol answers and the connection lingers
a moment, so that the client reads the answer rather than a reset.

The timer is only armed when a read ends with a request incomplete: a request that arrives in one
read, the usual case, starts none. Time that bytes wait on this side (a pipelined request behind an
answer) is not the client's. Idle time between requests on a kept-alive connection is uvicorn's
keep-alive timeout; bytes that start no request (blank lines) do not reset it for ever, nor does
the rest of a body answered before it arrived. A client that closes its sending side has left: its
request is abandoned (and the upstream request with it), as a proxy does.

httptools reads nothing after the head of a request carrying ``Upgrade`` (e.g. ``curl --http2``
on ``http://``): such a request without a body is served as plain HTTP and its connection closed
after it; one with a body is refused (400), as its body would be lost.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from router.asgi import REQUEST_FAILED, App
from router.errors import HeadersTooLarge, InvalidRequest, OpenWeightError, PayloadTooLarge, RequestTimeout
from router.settings import RouterConfig

_LINGER_S = 2.0
"""How long a connection answered outside a request (400, 408, 431) still reads before it closes."""


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a read timeout per request and a limit on its head.

    Configure it with :func:`guarded_protocol`; the limits are class attributes because uvicorn
    builds one protocol per connection from the class.
    """

    read_timeout_s: float = 30.0
    max_header_bytes: int = 64 * 1024
    max_request_bytes: int = 4 * 1024 * 1024 + 128 * 1024
    """Bytes a whole request may take (head, body with its framing, trailers)."""
    refused: Callable[[int], None] | None = None
    """Told the status of each answer the protocol gives itself (400, 408, 431): for metrics."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reading = True  # bytes of a request are due: a new connection, or bytes since the last request
        self._begun = False  # a request's first byte was parsed, and it is not complete
        self._in_head = True  # the next bytes are a request's head
        self._bytes = 0  # received since the last request was whole: bounds an endless head, body or trailer
        self._timer: asyncio.TimerHandle | None = None
        self._discarding = False  # this connection reads no more requests
        self._close_after_answer = False  # it closes (lingering) once the request being answered is

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            return
        self._reading = True
        self._bytes += len(data)
        super().data_received(data)
        if self._discarding or self.transport.is_closing():
            return
        if self._in_head and self._bytes > self.max_header_bytes:
            self._refuse(self._head_too_large())
        elif not self._in_head and self._bytes > self.max_request_bytes:
            # Past any body the app accepts (it answers 413 on its own from the body's size): an
            # endless body or trailer, or the rest of one answered already.
            self._abandon_body(PayloadTooLarge("the request body exceeds the router's limit"))
        elif self._reading and self._timer is None:
            self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()  # even when discarding: a fresh header list, not the last request's
        if not self._discarding:
            self._reading = self._begun = True

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_head:
            super().on_header(name, value)
        # Otherwise a chunked body's trailer: the app never sees trailers, so they are not kept
        # (uvicorn would add them to the request's headers, with no bound).

    def on_headers_complete(self) -> None:
        if self._discarding:
            return
        self._in_head = False
        if len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers) > self.max_header_bytes:
            self._refuse(self._head_too_large())
            return
        upgrade = self.parser.should_upgrade()
        if upgrade and any(name in (b"content-length", b"transfer-encoding") and value != b"0"
                           for name, value in self.headers):
            # The parser reads nothing after the head of an Upgrade request: its body would be lost.
            self._refuse(InvalidRequest(
                "protocol upgrades (an Upgrade header, e.g. from curl --http2) are not supported on requests "
                "with a body: send the request without it"
            ))
            return
        super().on_headers_complete()
        if upgrade:
            self.cycle.keep_alive = False  # nothing after it on this connection would be read

    def on_body(self, body: bytes) -> None:
        if not self._discarding:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._discarding:
            return
        self._reading = self._begun = False
        self._in_head, self._bytes = True, 0
        self._disarm()
        super().on_message_complete()
        cycle = self.cycle
        if cycle.response_complete and not self.pipeline and self.timeout_keep_alive_task is None:
            # Answered before its body was read: uvicorn armed its keep-alive timer then, and the
            # body's bytes cancelled it. Arm it again, or the connection could idle for ever.
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )

    def on_response_complete(self) -> None:
        resumed = bool(self.pipeline)
        super().on_response_complete()
        if self._close_after_answer and not self.transport.is_closing():
            self._linger()
            return
        if resumed and self._reading and not self._discarding and not self.transport.is_closing():
            # A pipelined request starts only now (its client may wait for a 100 Continue): its
            # time runs from here.
            self._disarm()
            self._arm()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes that are not HTTP/1.1, in OpenAI format."""
        if self._discarding:
            return
        if self._in_head:
            self._refuse(InvalidRequest("the request is not valid HTTP/1.1"))
        else:  # the body is malformed (e.g. its chunked encoding)
            self._abandon_body(InvalidRequest("the request body is not valid HTTP/1.1"))

    def _unsupported_upgrade_warning(self) -> None:
        pass  # an Upgrade request is served as plain HTTP (see on_headers_complete): nothing to warn of

    def _arm(self) -> None:
        self._timer = self.loop.call_later(self.read_timeout_s, self._read_timed_out)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _read_timed_out(self) -> None:
        self._timer = None
        if not self._reading or self._discarding or self.transport.is_closing():
            return
        if self.flow.read_paused or self.pipeline:
            # The request waits on this side (pipelined behind an answer, or its body not yet taken
            # by the app; a client that sent Expect: 100-continue waits for it): not the client's delay.
            self._arm()
            return
        cycle = self.cycle
        answering = cycle is not None and not cycle.response_complete
        late = RequestTimeout(f"the request did not arrive within {self.read_timeout_s:g} s")
        if not self._in_head and answering:
            assert cycle is not None
            self._fail(cycle, late)  # its body is late
        elif not self._in_head or not self._begun:
            # Answered before its body was read, or no request began (a connection that sent
            # nothing, or only blank lines): nothing to answer, the connection closes.
            if answering:
                assert cycle is not None
                cycle.keep_alive = False
            else:
                self.transport.close()
        else:
            self._refuse(late)

    def _head_too_large(self) -> HeadersTooLarge:
        return HeadersTooLarge(f"the request head exceeds the limit of {self.max_header_bytes} bytes")

    def _abandon_body(self, error: OpenWeightError) -> None:
        """Read no more of this request's body: the app answers `error` if it is still reading it;
        if the request was answered already (before its body was read), the connection just closes."""
        self._discarding = True
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            self._fail(cycle, error)
        else:
            self.transport.close()

    def _fail(self, cycle: Any, error: OpenWeightError) -> None:
        """Have the app answer `error` for the request it is reading, then close the connection."""
        self._close_after_answer = True
        cycle.scope[REQUEST_FAILED] = error
        cycle.message_event.set()

    def _refuse(self, error: OpenWeightError) -> None:
        """Answer `error` for a request the app has not seen, and read nothing more here."""
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # The request before it (pipelined) is still being answered: let it finish, then close.
            self._discarding = self._close_after_answer = True
            return
        self._answer(error)

    def _answer(self, error: OpenWeightError) -> None:
        """Write `error` as a whole response outside any request cycle, then close the connection."""
        body = error.body()
        head = (
            f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
        )
        self.transport.write(head.encode() + body)
        if self.refused is not None:
            self.refused(error.status)
        self._linger()

    def _linger(self) -> None:
        """Close after an answer without resetting the connection.

        Closing with unread bytes from the client would reset it, and the client's receive buffer
        (the answer) with it: end our side, discard what still comes for a moment, then close.
        """
        self._disarm()
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
        "max_request_bytes": config.max_body_bytes + 2 * config.max_header_bytes + 64 * 1024,
        "refused": staticmethod(refused) if refused is not None else None,
    }
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), attributes)


def server_config(
    app: App, config: RouterConfig, *, refused: Callable[[int], None] | None = None, **overrides: Any
) -> uvicorn.Config:
    """The uvicorn configuration the router runs with.

    `refused` is told the status of every answer the server gives itself, for requests that never
    reach `app` (e.g. :meth:`router.metrics.Metrics.refused`); `overrides`: other uvicorn options,
    e.g. another port in tests.
    """
    options: dict[str, Any] = {
        "host": config.host,
        "port": config.port,
        "loop": "uvloop",
        "http": guarded_protocol(config, refused),
        "lifespan": "on",
        "access_log": False,
        "server_header": False,
        "proxy_headers": False,
        # Whole seconds, at least the grace period.
        "timeout_graceful_shutdown": math.ceil(config.shutdown_grace_s),
        "ws": "none",  # no WebSocket route: an Upgrade request without a body is served as plain HTTP
        "timeout_keep_alive": 30,
        "log_level": "info",
    }
    return uvicorn.Config(app, **{**options, **overrides})
