"""Upstreams over HTTP with httpx: the Ray Serve OpenAI ingress and every external provider.

This module is the one place where httpx exceptions become :mod:`router.errors` exceptions.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import httpx

from router.errors import UpstreamConnectError, UpstreamError, UpstreamProtocolError, UpstreamTimeout
from router.settings import CLUSTER, ClusterConfig, ProviderConfig, UpstreamConfig
from router.upstreams.base import UpstreamRequest


@contextmanager
def map_httpx_errors(upstream: str) -> Iterator[None]:
    """Translate httpx's exceptions into the router's tree, naming the upstream but no URL or key."""
    try:
        yield
    except httpx.TimeoutException as exc:
        phase = "connect" if isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout) else "read"
        raise UpstreamTimeout(f"{upstream}: {phase} timeout") from None
    except httpx.ConnectError:
        raise UpstreamConnectError(f"{upstream}: connection failed") from None
    except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
        raise UpstreamProtocolError(f"{upstream}: {type(exc).__name__}") from None
    except httpx.HTTPError as exc:
        raise UpstreamError(f"{upstream}: {type(exc).__name__}") from None


class HttpResponse:
    """A started httpx streaming response, with its first body chunk already read."""

    __slots__ = ("_chunks", "_closed", "_response", "_upstream", "first_chunk", "headers", "status")

    def __init__(self, upstream: str, response: httpx.Response) -> None:
        self._upstream = upstream
        self._response = response
        self._chunks = response.aiter_raw()
        self._closed = False
        self.status = response.status_code
        self.headers = {k.lower(): v for k, v in response.headers.items()}
        self.first_chunk = b""

    async def _read_first(self) -> None:
        with map_httpx_errors(self._upstream):
            async for chunk in self._chunks:
                if chunk:
                    self.first_chunk = chunk
                    return

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        with map_httpx_errors(self._upstream):
            async for chunk in self._chunks:
                if chunk:
                    yield chunk

    async def aread(self) -> bytes:
        parts = [self.first_chunk]
        async for chunk in self.aiter_bytes():
            parts.append(chunk)
        return b"".join(parts)

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self._response.aclose()


class HttpUpstream:
    """An OpenAI-compatible API reached over HTTP.

    The connection pool is kept for the router's lifetime. Content is decoded by nobody: bytes
    are relayed as they arrive (``aiter_raw``), so a compressed upstream answer is passed through
    with its ``content-encoding``.
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
        self._client = httpx.AsyncClient(
            base_url=config.url + "/",
            headers=headers or {},
            timeout=httpx.Timeout(
                connect=config.connect_timeout_s,
                read=config.read_timeout_s,
                write=config.read_timeout_s,
                pool=config.connect_timeout_s,
            ),
            limits=httpx.Limits(
                max_connections=config.max_connections, max_keepalive_connections=config.max_connections
            ),
            # Never read proxy settings or netrc credentials from the environment for upstream calls.
            trust_env=False,
            follow_redirects=False,
        )

    async def send(self, request: UpstreamRequest, timeout_s: float) -> HttpResponse:
        headers = {"x-request-id": request.request_id, **request.headers}
        if request.body is not None:
            headers["content-type"] = "application/json"
        if self._request_timeout_s is not None:
            # Ray Serve answers 408 past this instead of holding a request no replica can take.
            headers["x-request-timeout-seconds"] = str(max(1, int(min(self._request_timeout_s, timeout_s))))
        outgoing = self._client.build_request(
            request.method, request.path.lstrip("/"), content=request.body, headers=headers
        )
        response: httpx.Response | None = None
        try:
            async with asyncio.timeout(min(timeout_s, self.config.first_byte_timeout_s)):
                with map_httpx_errors(self.name):
                    response = await self._client.send(outgoing, stream=True)
                started = HttpResponse(self.name, response)
                await started._read_first()
        except TimeoutError:
            if response is not None:
                await response.aclose()
            raise UpstreamTimeout(f"{self.name}: no first byte within the timeout") from None
        except BaseException:
            if response is not None:
                await response.aclose()
            raise
        return started

    async def probe(self) -> bool:
        try:
            response = await self._client.get("models", timeout=self.config.connect_timeout_s + 3.0)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def aclose(self) -> None:
        await self._client.aclose()


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
