"""A lean HTTP/1.1 client for the relay: asyncio protocols, httptools' parser, kept-alive connections.

It does one thing: send a request whose body is in memory, then hand over the answer's status,
headers and body chunks as they arrive. No redirects, cookies, proxies, decompression or retries:
the router wants none of them, and aiohttp's client spent about 0.3 ms of CPU per request in
Python doing them (a third of the router's CPU per request; ``openweight bench overhead``).

Failures surface as the built-in :class:`OSError` (connecting), :class:`ConnectTimeout`,
:class:`ConnectionClosed` and :class:`ParseError`; :mod:`router.upstreams.http` translates them.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from typing import cast

import httptools

_HIGH_WATER = 256 * 1024
"""Buffered answer bytes above which reading from the upstream pauses (a slow client)."""


class ConnectTimeout(Exception):
    """No connection within the connect timeout."""


class ConnectionClosed(Exception):
    """The upstream closed the connection before the answer was complete."""


class ParseError(Exception):
    """The upstream's answer is not valid HTTP/1.1."""


class Connection(asyncio.Protocol):
    """One connection, one exchange at a time: :meth:`send`, then :meth:`read` until ``b""``."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._loop = asyncio.get_running_loop()
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.complete = False
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._head: asyncio.Future[None] | None = None
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._error: Exception | None = None
        self._paused = False
        self._until_eof = False
        self._keep_alive = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not its subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._head is None or self.complete:
            return
        if self._head.done() and self._until_eof:
            self.complete = True  # a body without length ends when the connection does
        else:
            self._fail(ConnectionClosed("the upstream closed the connection"))
        self._wake()

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ParseError(str(exc)))
            self.close()

    # httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        self.headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in self._raw_headers}
        self._until_eof = "content-length" not in self.headers and "chunked" not in self.headers.get(
            "transfer-encoding", "").lower()
        self._keep_alive = bool(self._parser.should_keep_alive())  # known here; reset once the message ends
        if self._head is not None and not self._head.done():
            self._head.set_result(None)

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self._wake()

    # one exchange

    async def send(self, data: bytes) -> None:
        """Write a whole request; return once the answer's status and headers arrived."""
        self._reset()
        self._head = head = self._loop.create_future()
        assert self.transport is not None
        self.transport.write(data)
        await head

    async def read(self, timeout_s: float | None) -> bytes:
        """The answer's body bytes that arrived since the last call (waiting for some); ``b""`` at the end.

        Raises TimeoutError when nothing arrives within ``timeout_s``.
        """
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self.complete:
                return b""
            self._waiter = waiter = self._loop.create_future()
            timer = self._loop.call_later(timeout_s, _expire, waiter) if timeout_s is not None else None
            try:
                await waiter
            finally:
                self._waiter = None
                if timer is not None:
                    timer.cancel()
        data = self._chunks.popleft() if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    @property
    def reusable(self) -> bool:
        """The answer was read to its end and the connection may carry another exchange."""
        return self.complete and self._keep_alive and not self.closed and self._error is None and not self._until_eof

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self.closed = True

    def _fail(self, error: Exception) -> None:
        self._error = error
        if self._head is not None and not self._head.done():
            self._head.set_exception(error)
            self._head.exception()  # retrieved here: whoever awaits it gets it too
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class Pool:
    """Kept-alive connections to one origin, at most ``limit`` in use at once."""

    def __init__(self, host: str, port: int, *, tls: bool, limit: int, connect_timeout_s: float,
                 idle_timeout_s: float = 30.0) -> None:
        self.host, self.port = host, port
        self._ssl = ssl.create_default_context() if tls else None
        self._limit = limit
        self._connect_timeout_s = connect_timeout_s
        self._idle_timeout_s = idle_timeout_s
        self._idle: list[Connection] = []
        self._slots: asyncio.Semaphore | None = None

    async def acquire(self) -> Connection:
        """A connection of its own for one exchange; give it back with :meth:`release`."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self._limit)
        await self._slots.acquire()
        try:
            now = time.monotonic()
            while self._idle:
                connection = self._idle.pop()
                if not connection.closed and now - connection.idle_since < self._idle_timeout_s:
                    return connection
                connection.close()
            return await self._connect()
        except BaseException:
            self._slots.release()
            raise

    async def _connect(self) -> Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                _, connection = await loop.create_connection(
                    Connection, self.host, self.port, ssl=self._ssl,
                    server_hostname=self.host if self._ssl is not None else None,
                )
        except TimeoutError:
            raise ConnectTimeout(f"no connection within {self._connect_timeout_s} s") from None
        return connection

    def release(self, connection: Connection) -> None:
        """Take back a connection from :meth:`acquire`: kept when its answer was read to the end."""
        assert self._slots is not None
        self._slots.release()
        if connection.reusable:
            connection.idle_since = time.monotonic()
            self._idle.append(connection)
        else:
            connection.close()

    def close(self) -> None:
        for connection in self._idle:
            connection.close()
        self._idle.clear()


def request_head(method: str, path: str, host: str, headers: dict[str, str], body_length: int | None) -> bytes:
    """The request line and headers (``path`` as sent, e.g. ``/v1/chat/completions``)."""
    lines = [f"{method} {path} HTTP/1.1\r\nhost: {host}\r\n"]
    lines += [f"{name}: {value}\r\n" for name, value in headers.items()]
    if body_length is not None:
        lines.append(f"content-length: {body_length}\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("latin-1")
