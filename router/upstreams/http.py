"""Upstreams over HTTP: the Ray Serve OpenAI ingress and every external provider.

The client is :mod:`router.upstreams.wire`, a lean HTTP/1.1 client (asyncio protocols and
httptools' parser): on the relay's hot path it costs a fraction of the CPU of httpx or aiohttp
per request and per chunk (see the README's performance section). This module is the one place
where the HTTP client's exceptions become :mod:`router.errors` exceptions.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

from router.errors import UpstreamConnectError, UpstreamError, UpstreamProtocolError, UpstreamTimeout
from router.settings import CLUSTER, ClusterConfig, ProviderConfig, UpstreamConfig
from router.upstreams.base import UpstreamRequest
from router.upstreams.wire import Connection, ConnectionClosed, ConnectTimeout, ParseError, Pool, request_head


@contextmanager
def map_client_errors(upstream: str, phase: str = "read") -> Iterator[None]:
    """Translate the HTTP client's exceptions, naming the upstream but no URL or key."""
    try:
        yield
    except ConnectTimeout:
        raise UpstreamTimeout(f"{upstream}: connect timeout") from None
    except TimeoutError:
        raise UpstreamTimeout(f"{upstream}: {phase} timeout") from None
    except ConnectionClosed:
        raise UpstreamProtocolError(f"{upstream}: the connection closed before the answer was complete") from None
    except ParseError:
        raise UpstreamProtocolError(f"{upstream}: not a valid HTTP answer") from None
    except (ConnectionError, ssl.SSLError) as exc:
        raise UpstreamConnectError(f"{upstream}: connection failed ({type(exc).__name__})") from None
    except OSError as exc:
        raise UpstreamError(f"{upstream}: {type(exc).__name__}") from None


class HttpResponse:
    """A started response, with its first body chunk already read; holds its connection until closed."""

    __slots__ = ("_connection", "_pool", "_read_timeout_s", "_upstream", "first_chunk", "headers", "status")

    def __init__(self, upstream: str, pool: Pool, connection: Connection, read_timeout_s: float) -> None:
        self._upstream = upstream
        self._pool: Pool | None = pool
        self._connection = connection
        self._read_timeout_s = read_timeout_s
        self.status = connection.status
        self.headers = connection.headers
        self.first_chunk = b""

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        read, timeout = self._connection.read, self._read_timeout_s
        with map_client_errors(self._upstream):
            while chunk := await read(timeout):
                yield chunk

    async def aread(self) -> bytes:
        parts = [self.first_chunk]
        async for chunk in self.aiter_bytes():
            parts.append(chunk)
        return b"".join(parts)

    async def aclose(self) -> None:
        self.release()

    def release(self) -> None:
        """Back to the pool when read to its end, else abandoned (the upstream sees the connection go)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.release(self._connection)


class HttpUpstream:
    """An OpenAI-compatible API reached over HTTP, with a connection pool kept for the router's life.

    Bodies are relayed as the bytes that arrive; no ``accept-encoding`` is sent, so answers come
    uncompressed (and a server that compresses anyway passes through with its ``content-encoding``).
    """

    def __init__(
        self,
        name: str,
        config: UpstreamConfig,
        *,
        headers: dict[str, str] | None = None,
        request_timeout_s: float | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self._request_timeout_s = request_timeout_s
        url = urlsplit(config.url)
        tls = url.scheme == "https"
        host, port = url.hostname or "localhost", url.port or (443 if tls else 80)
        self._host = host if url.port is None else f"{host}:{port}"
        self._base = url.path.rstrip("/") + "/"
        for key, value in (headers or {}).items():
            if any(c in key + value for c in "\r\n"):
                raise ValueError(f"{name}: header {key!r} holds a line break")
        self._headers = {"accept": "*/*", **(headers or {})}
        self._pool = Pool(host, port, tls=tls, limit=config.max_connections, connect_timeout_s=config.connect_timeout_s)

    def _head(self, method: str, path: str, headers: dict[str, str], body: bytes | None) -> bytes:
        return request_head(method, self._base + path.lstrip("/"), self._host, {**self._headers, **headers},
                            None if body is None else len(body))

    async def send(self, request: UpstreamRequest, timeout_s: float) -> HttpResponse:
        headers = {"x-request-id": request.request_id, **request.headers}
        if request.body is not None:
            headers["content-type"] = "application/json"
        if self._request_timeout_s is not None:
            # Ray Serve answers 408 past this instead of holding a request no replica can take.
            headers["x-request-timeout-seconds"] = str(max(1, int(min(self._request_timeout_s, timeout_s))))
        head = self._head(request.method, request.path, headers, request.body)
        response: HttpResponse | None = None
        try:
            async with asyncio.timeout(min(timeout_s, self.config.first_byte_timeout_s)):
                with map_client_errors(self.name, "first byte"):
                    connection = await self._pool.acquire()
                    response = HttpResponse(self.name, self._pool, connection, self.config.read_timeout_s)
                    await connection.send(head + request.body if request.body else head)
                    response.status, response.headers = connection.status, connection.headers
                    response.first_chunk = await connection.read(None)
        except TimeoutError:
            if response is not None:
                response.release()
            raise UpstreamTimeout(f"{self.name}: no first byte within the timeout") from None
        except BaseException:
            if response is not None:
                response.release()
            raise
        return response

    async def probe(self) -> bool:
        try:
            async with asyncio.timeout(self.config.connect_timeout_s + 3.0):
                with map_client_errors(self.name):
                    connection = await self._pool.acquire()
                    response = HttpResponse(self.name, self._pool, connection, self.config.read_timeout_s)
                    try:
                        await connection.send(self._head("GET", "models", {}, None))
                        response.status = connection.status
                        await response.aread()
                    finally:
                        response.release()
            return response.status == 200
        except (UpstreamError, TimeoutError):
            return False

    async def aclose(self) -> None:
        self._pool.close()


def cluster_upstream(config: ClusterConfig) -> HttpUpstream:
    """The self-hosted Ray Serve ingress."""
    return HttpUpstream(CLUSTER, config, request_timeout_s=config.request_timeout_s)


def provider_upstream(name: str, config: ProviderConfig) -> HttpUpstream:
    """An external provider; its key is read from the environment once, here, and sent only to it."""
    headers = dict(config.headers)
    key = config.api_key()
    if key:
        headers["authorization"] = f"Bearer {key}"
    return HttpUpstream(name, config, headers=headers)
