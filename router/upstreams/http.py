"""Upstreams over HTTP: the Ray Serve OpenAI ingress and every external provider.

The client is aiohttp: on the relay's hot path it costs a fraction of the CPU of httpx/httpcore
per request and per chunk (see the README's performance section). This module is the one place
where the HTTP client's exceptions become :mod:`router.errors` exceptions.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import aiohttp
from aiohttp.payload import BytesPayload
from yarl import URL

from router.errors import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamSaturated,
    UpstreamTimeout,
)
from router.settings import CLUSTER, ClusterConfig, ConfigError, ProviderConfig, UpstreamConfig, header_safe
from router.upstreams.base import UpstreamRequest
from router.upstreams.coding import Decoder, decoder_for
from router.upstreams.credentials import Credentials, media_type

_COMPRESSED = (b"\x1f\x8b", b"\x78\x01", b"\x78\x5e", b"\x78\x9c", b"\x78\xda")
"""How gzip and zlib data begin; an answer in JSON or server-sent events never does."""


def client_error(upstream: str, exc: BaseException) -> UpstreamError:
    """The :mod:`router.errors` exception for an HTTP client exception, naming the upstream but no URL or key."""
    if isinstance(exc, (TimeoutError, aiohttp.ServerTimeoutError)):
        phase = "connect" if isinstance(exc, aiohttp.ConnectionTimeoutError) else "read"
        return UpstreamTimeout(f"{upstream}: {phase} timeout")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamConnectError(f"{upstream}: connection failed")
    if isinstance(exc, (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        return UpstreamProtocolError(f"{upstream}: {type(exc).__name__}")
    return UpstreamError(f"{upstream}: {type(exc).__name__}")


@contextmanager
def map_client_errors(upstream: str) -> Iterator[None]:
    """Translate the HTTP client's exceptions (see :func:`client_error`)."""
    try:
        yield
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise client_error(upstream, exc) from None


class HttpResponse:
    """A started response, with its first body chunk already read.

    Its body arrives decoded (see :mod:`router.upstreams.coding`) and `headers` holds only what the
    router reads: a well-formed ``content-type`` with no credential in it, and ``retry-after``.
    """

    __slots__ = ("_credentials", "_decoder", "_done", "_limit", "_response", "_upstream", "first_chunk", "headers",
                 "status")

    def __init__(self, upstream: str, response: aiohttp.ClientResponse, credentials: Credentials,
                 done: Callable[[], None], limit: int) -> None:
        self._upstream = upstream
        self._response = response
        self._credentials = credentials
        self._done: Callable[[], None] | None = done
        self._limit = limit
        self.status = response.status
        self._decoder: Decoder | None = decoder_for(upstream, response.headers)
        self.headers: dict[str, str] = {}
        if (content_type := media_type(response.headers.get("content-type"), credentials)) is not None:
            self.headers["content-type"] = content_type
        if (retry_after := response.headers.get("retry-after")) is not None:
            self.headers["retry-after"] = retry_after
        self.first_chunk = b""

    async def _read_first(self) -> None:
        self.first_chunk = await self.read_chunk()  # read_chunk translates the client's errors
        if self.first_chunk.startswith(_COMPRESSED):
            # Compressed bytes labelled as plain: the client could decode what the router cannot inspect.
            raise UpstreamProtocolError(f"{self._upstream}: a compressed answer without its content-encoding")

    async def read_chunk(self) -> bytes:
        # Called once per relayed chunk: a plain try costs nothing, a context manager would.
        try:
            if self._decoder is None:
                return await self._response.content.readany()
            return await self._read_decoded(self._decoder)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise client_error(self._upstream, exc) from None

    async def _read_decoded(self, decoder: Decoder) -> bytes:
        """The next decoded bytes; ``b""`` only at the body's end (a compressed header alone decodes to nothing)."""
        while True:
            if decoder.pending:
                out = decoder.feed(b"")
            else:
                raw = await self._response.content.readany()
                if not raw:
                    decoder.end()
                    return b""
                out = decoder.feed(raw)
            if out:
                return out

    async def aread(self) -> bytes:
        parts, size = [self.first_chunk], len(self.first_chunk)
        while chunk := await self.read_chunk():
            size += len(chunk)
            if size > self._limit:
                raise UpstreamProtocolError(f"{self._upstream}: an answer larger than {self._limit} bytes")
            parts.append(chunk)
        return b"".join(parts)

    def redact(self, data: bytes) -> bytes:
        return self._credentials.redact(data) if self._credentials else data

    async def aclose(self) -> None:
        if self._response.content.at_eof():
            self._response.release()  # back to the pool
        else:
            self._response.close()  # abandon: the upstream sees the connection go
        if self._done is not None:
            self._done()
            self._done = None


class HttpUpstream:
    """An OpenAI-compatible API reached over HTTP, with a connection pool kept for the router's life."""

    def __init__(
        self,
        name: str,
        config: UpstreamConfig,
        *,
        headers: dict[str, str] | None = None,
        request_timeout_s: float | None = None,
        credentials: Credentials | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self._headers = {**(headers or {}), "accept-encoding": "identity"}
        self._credentials = credentials if credentials is not None else Credentials.of(config.url)
        """Everything sent to it as a credential: scrubbed from whatever it sends back."""
        self._request_timeout_s = request_timeout_s
        self._base = config.url + "/"
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=config.connect_timeout_s, sock_read=config.read_timeout_s
        )
        self._session: aiohttp.ClientSession | None = None
        self.in_flight = 0
        """Requests sent and not yet closed (bounded by ``config.max_connections``)."""
        self._urls: dict[str, URL] = {}
        """Parsed once per endpoint path, not per request."""

    def _client(self) -> aiohttp.ClientSession:
        # Created on first use: a session belongs to the running event loop.
        if self._session is None:
            self._session = aiohttp.ClientSession(
                # The limit is in_flight's, checked before sending: a request never waits for a
                # pooled connection inside its first-byte timeout (a full pool is not a dead upstream).
                connector=aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=30),
                headers=self._headers,
                timeout=self._timeout,
                auto_decompress=False,  # decoded by router.upstreams.coding, strictly
                # Never keep an upstream's cookies: they would go out again with other clients' requests.
                cookie_jar=aiohttp.DummyCookieJar(),
                # Never read proxy settings or netrc credentials from the environment for upstream calls.
                trust_env=False,
                # Accept-Encoding is `identity` (the session's headers): plain bytes that can be
                # inspected and relayed event by event.
                skip_auto_headers=("user-agent", "accept-encoding"),
            )
        return self._session

    async def send(self, request: UpstreamRequest, timeout_s: float) -> HttpResponse:
        headers = {"x-request-id": request.request_id, **request.headers}
        if request.body is not None:
            headers["content-type"] = "application/json"
        if self._request_timeout_s is not None:
            # Ray Serve answers 408 past this instead of holding a request no replica can take.
            headers["x-request-timeout-seconds"] = str(max(1, int(min(self._request_timeout_s, timeout_s))))
        limit = self.config.max_connections
        if limit is not None and self.in_flight >= limit:
            raise UpstreamSaturated(f"{self.name}: {limit} requests in flight, its max_connections")
        self.in_flight += 1
        response: aiohttp.ClientResponse | None = None
        try:
            async with asyncio.timeout(min(timeout_s, self.config.first_byte_timeout_s)):
                url = self._urls.get(request.path)
                if url is None:
                    url = self._urls[request.path] = URL(self._base + request.path.lstrip("/"))
                body = None if request.body is None else BytesPayload(request.body, content_type="application/json")
                with map_client_errors(self.name):
                    response = await self._client().request(
                        request.method, url, data=body, headers=headers, allow_redirects=False
                    )
                started = HttpResponse(self.name, response, self._credentials, self._finished,
                                       self.config.max_response_bytes)
                await started._read_first()
        except BaseException as exc:
            self._finished()
            if response is not None:
                response.close()
            if isinstance(exc, TimeoutError):
                raise UpstreamTimeout(f"{self.name}: no first byte within the timeout") from None
            raise
        return started

    def _finished(self) -> None:
        self.in_flight -= 1

    async def probe(self) -> bool:
        timeout = aiohttp.ClientTimeout(total=self.config.connect_timeout_s + 3.0)
        try:
            async with self._client().get(self._base + "models", timeout=timeout) as response:
                await response.read()
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def cluster_upstream(config: ClusterConfig) -> HttpUpstream:
    """The self-hosted Ray Serve ingress."""
    return HttpUpstream(CLUSTER, config, request_timeout_s=config.request_timeout_s)


def provider_upstream(name: str, config: ProviderConfig) -> HttpUpstream:
    """An external provider; its key is read from the environment once, here, and sent only to it."""
    headers = dict(config.headers)
    credentials = Credentials.of(config.url, key=config.api_key(), headers=config.headers)
    key = config.api_key()
    if key:
        if not header_safe(key):
            raise ConfigError(
                f"providers.{name}.api_key_env: {config.api_key_env} holds characters an HTTP header cannot carry"
            )
        headers["authorization"] = f"Bearer {key}"
    return HttpUpstream(name, config, headers=headers, credentials=credentials)
