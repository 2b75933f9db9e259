"""The least a Python proxy on uvicorn can do: the ``floor`` targets of ``openweight bench overhead``.

``python -m bench.floor --port P --upstream http://127.0.0.1:U`` serves a pure ASGI app on
uvicorn (uvloop, httptools, no access log, like the router) that passes each request to the
upstream over a pool of kept-alive connections with a minimal HTTP/1.1 client (an asyncio protocol
and httptools' response parser) and relays the answer chunk by chunk. It has no routing, no
fallback, no metrics, no error handling worth the name: it is not a router, only the measure of
what uvicorn plus one upstream round trip cost in Python, so the router's own share can be told
apart from the share no Python router on this stack can avoid.

With ``--client aiohttp`` (the ``floor-aiohttp`` target) the same bare proxy talks to the upstream
through an aiohttp session set up as the router's: the server stack plus the router's HTTP client,
without the router. The three targets split a request's cost into server, client library and router.
"""

from __future__ import annotations

import argparse
import asyncio
from collections import deque
from typing import cast
from urllib.parse import urlsplit

import aiohttp
import httptools
import uvicorn

from router.asgi import Message, Receive, Scope, Send


class _Connection(asyncio.Protocol):
    """One kept-alive connection; :meth:`exchange` sends a request and yields its answer's parts."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.parts: deque[Message] = deque()
        self.wakeup: asyncio.Future[None] | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.open = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not its subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        self._push({"type": "lost"})

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"content-type":
            self.headers.append((b"content-type", value))

    def on_headers_complete(self) -> None:
        self._push({"type": "http.response.start", "status": self.parser.get_status_code(), "headers": self.headers})

    def on_body(self, body: bytes) -> None:
        self._push({"type": "http.response.body", "body": body, "more_body": True})

    def on_message_complete(self) -> None:
        self._push({"type": "http.response.body", "body": b"", "more_body": False})

    def _push(self, part: Message) -> None:
        self.parts.append(part)
        if self.wakeup is not None and not self.wakeup.done():
            self.wakeup.set_result(None)

    async def next_part(self) -> Message:
        while not self.parts:
            self.wakeup = asyncio.get_running_loop().create_future()
            await self.wakeup
        return self.parts.popleft()


class FloorProxy:
    """The ASGI app."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.prefix = f"Host: {self.host}:{self.port}\r\ncontent-type: application/json\r\n".encode()
        self.idle: list[_Connection] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                while (await receive())["type"] != "lifespan.shutdown":
                    await send({"type": "lifespan.startup.complete"})
                await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["path"] == "/healthz":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        await self._exchange(scope, body, send)

    async def _exchange(self, scope: Scope, body: bytes, send: Send) -> None:
        connection = await self._connection()
        head = f"{scope['method']} {scope['path']} HTTP/1.1\r\ncontent-length: {len(body)}\r\n".encode()
        assert connection.transport is not None
        connection.transport.write(b"".join((head, self.prefix, b"\r\n", body)))
        while True:
            part = await connection.next_part()
            if part["type"] == "lost":
                return
            await send(part)
            if part["type"] == "http.response.body" and not part["more_body"]:
                break
        connection.headers = []
        if connection.open:
            self.idle.append(connection)

    async def _connection(self) -> _Connection:
        while self.idle:
            connection = self.idle.pop()
            if connection.open:
                return connection
        _, protocol = await asyncio.get_running_loop().create_connection(_Connection, self.host, self.port)
        return protocol


class AiohttpFloorProxy(FloorProxy):
    """The same bare proxy with the router's HTTP client (an aiohttp session, pooled, no cookies)."""

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self.base = upstream.rstrip("/")
        self.session: aiohttp.ClientSession | None = None

    async def _exchange(self, scope: Scope, body: bytes, send: Send) -> None:
        if self.session is None:
            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=100, limit_per_host=0, keepalive_timeout=30),
                auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(), trust_env=False,
                skip_auto_headers=("user-agent", "accept-encoding"),
            )
        url = self.base + scope["path"]
        async with self.session.request(scope["method"], url, data=body,
                                        headers={"content-type": "application/json"}) as response:
            content_type = response.headers.get("content-type", "application/json").encode()
            await send({"type": "http.response.start", "status": response.status,
                        "headers": [(b"content-type", content_type)]})
            while chunk := await response.content.readany():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="base URL of the upstream, e.g. http://127.0.0.1:9000")
    parser.add_argument("--client", choices=("minimal", "aiohttp"), default="minimal",
                        help="the upstream client: a minimal HTTP/1.1 one, or an aiohttp session as in the router")
    args = parser.parse_args()
    app = AiohttpFloorProxy(args.upstream) if args.client == "aiohttp" else FloorProxy(args.upstream)
    uvicorn.run(app, host="127.0.0.1", port=args.port, loop="uvloop", http="httptools",
                lifespan="on", access_log=False, log_level="warning")


if __name__ == "__main__":
    main()
