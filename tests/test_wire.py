"""The lean HTTP/1.1 client against raw asyncio servers on 127.0.0.1 that answer exactly what a test says."""

from __future__ import annotations

import asyncio

import pytest

from router.errors import UpstreamConnectError, UpstreamProtocolError, UpstreamTimeout
from router.settings import ProviderConfig
from router.upstreams.base import UpstreamRequest
from router.upstreams.http import HttpUpstream
from router.upstreams.wire import Pool


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    return head + await reader.readexactly(length)


class Server:
    """Answers every request on a connection with ``answer``; counts connections and keeps requests."""

    def __init__(self, *answers: bytes, close_after: bool = False) -> None:
        self.answers = list(answers)
        self.close_after = close_after
        self.connections = 0
        self.requests: list[bytes] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                self.requests.append(await _read_request(reader))
                answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
                writer.write(answer)
                await writer.drain()
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/v1"

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()


def _request(body: bytes = b'{"model": "m"}') -> UpstreamRequest:
    return UpstreamRequest("POST", "chat/completions", body, "req-1")


def _ok(body: bytes, *headers: str) -> bytes:
    head = "".join(f"{h}\r\n" for h in headers)
    return f"HTTP/1.1 200 OK\r\ncontent-length: {len(body)}\r\n{head}\r\n".encode() + body


async def _exchange(upstream: HttpUpstream, body: bytes = b'{"model": "m"}') -> tuple[int, bytes]:
    response = await upstream.send(_request(body), 5)
    try:
        return response.status, await response.aread()
    finally:
        await response.aclose()


def test_requests_reuse_one_kept_alive_connection_and_carry_their_headers() -> None:
    async def main() -> None:
        server = Server(_ok(b'{"a": 1}', "content-type: application/json"))
        async with server as url:
            upstream = HttpUpstream("p", ProviderConfig(url=url), headers={"authorization": "Bearer k"})
            for _ in range(3):
                assert await _exchange(upstream, b'{"x": "y"}') == (200, b'{"a": 1}')
            await upstream.aclose()
        assert server.connections == 1
        head, _, body = server.requests[0].partition(b"\r\n\r\n")
        assert head.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
        lines = head.lower().split(b"\r\n")
        assert b"authorization: bearer k" in lines and b"x-request-id: req-1" in lines
        assert b"content-type: application/json" in lines and b"content-length: 10" in lines
        assert body == b'{"x": "y"}'

    asyncio.run(main())


def test_chunked_and_unframed_bodies_are_read_to_their_end() -> None:
    chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    unframed = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\ndata: 1\n\n"  # ends when the socket does

    async def main() -> None:
        async with Server(chunked) as url:
            upstream = HttpUpstream("p", ProviderConfig(url=url))
            assert await _exchange(upstream) == (200, b"abcde")
            await upstream.aclose()
        server = Server(unframed, close_after=True)
        async with server as url:
            upstream = HttpUpstream("p", ProviderConfig(url=url))
            for _ in range(2):  # an unframed answer's connection is never reused
                assert await _exchange(upstream) == (200, b"data: 1\n\n")
            await upstream.aclose()
        assert server.connections == 2

    asyncio.run(main())


def test_a_connection_the_server_closes_is_not_reused() -> None:
    async def main() -> None:
        server = Server(_ok(b"{}", "connection: close"), close_after=True)
        async with server as url:
            upstream = HttpUpstream("p", ProviderConfig(url=url))
            for _ in range(3):
                assert await _exchange(upstream) == (200, b"{}")
            await upstream.aclose()
        assert server.connections == 3

    asyncio.run(main())


def test_failures_become_upstream_errors() -> None:
    cut = b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial"
    garbage = b"NOT HTTP AT ALL\r\n\r\n"

    async def main() -> None:
        async with Server(cut, close_after=True) as url:
            upstream = HttpUpstream("p", ProviderConfig(url=url))
            response = await upstream.send(_request(), 5)
            with pytest.raises(UpstreamProtocolError, match="closed before the answer was complete"):
                await response.aread()
            await response.aclose()
        async with Server(garbage) as url:
            upstream = HttpUpstream("p", ProviderConfig(url=url))
            with pytest.raises(UpstreamProtocolError, match="not a valid HTTP answer"):
                await upstream.send(_request(), 5)
        async with Server(_ok(b"")) as url:
            pass  # the port is free again: nothing listens
        upstream = HttpUpstream("p", ProviderConfig(url=url))
        with pytest.raises(UpstreamConnectError, match="connection failed"):
            await upstream.send(_request(), 5)

    asyncio.run(main())


def test_a_stalled_stream_times_out_between_chunks() -> None:
    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nab\r\n")
        await writer.drain()
        await asyncio.sleep(5)
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(stall, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
        upstream = HttpUpstream("p", ProviderConfig(url=url, read_timeout_s=0.2))
        response = await upstream.send(_request(), 5)
        assert response.first_chunk == b"ab"
        with pytest.raises(UpstreamTimeout, match="read timeout"):
            await response.aread()
        await response.aclose()
        server.close()

    asyncio.run(main())


def test_a_large_answer_flows_through_a_slow_reader() -> None:
    body = bytes(range(256)) * 8192  # 2 MiB: reading pauses and resumes

    async def main() -> None:
        async with Server(_ok(body)) as url:
            upstream = HttpUpstream("p", ProviderConfig(url=url))
            response = await upstream.send(_request(), 5)
            parts = [response.first_chunk]
            async for chunk in response.aiter_bytes():
                parts.append(chunk)
                await asyncio.sleep(0.001)
            await response.aclose()
            await upstream.aclose()
        assert b"".join(parts) == body

    asyncio.run(main())


def test_the_pool_never_has_more_connections_in_use_than_its_limit() -> None:
    async def main() -> None:
        async with Server(_ok(b"{}")) as url:
            port = int(url.rsplit(":", 1)[1].split("/")[0])
            pool = Pool("127.0.0.1", port, tls=False, limit=1, connect_timeout_s=1)
            first = await pool.acquire()
            second = asyncio.ensure_future(pool.acquire())
            await asyncio.sleep(0.05)
            assert not second.done()
            pool.release(first)
            pool.release(await asyncio.wait_for(second, 1))
            pool.close()

    asyncio.run(main())
