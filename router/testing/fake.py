"""The scripted fake upstream itself; see :mod:`router.testing`."""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import threading
import time
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import uvicorn

from router.asgi import Receive, Scope, Send, until_disconnect
from router.server_thread import ServerThread
from router.testing.capacity import CAPACITY_PATH, CapacityRoute
from router.testing.wire import QUIET_CUTS, Cut, error_body, read_body, response_headers, send_body

PROMPT_TOKENS = 7
"""``usage.prompt_tokens`` of every answer."""

_ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "text", "/v1/embeddings": "embed"}


@dataclass(frozen=True)
class Behavior:
    """How the fake answers one inference request.

    A non-stream answer waits ``delay_before_headers_s`` plus ``chunks * chunk_delay_s`` (its
    generation time); a stream waits ``delay_before_headers_s`` and then ``chunk_delay_s`` before
    each content chunk.
    """

    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    """Extra response headers, e.g. ``Retry-After``."""
    body: bytes | None = None
    """Raw body sent instead of the generated answer; default for non-200: an OpenAI error JSON."""
    delay_before_headers_s: float = 0.0
    chunks: int = 5
    """Content chunks (``"tok0 "``, ``"tok1 "``, ...); also ``usage.completion_tokens``."""
    chunk_delay_s: float = 0.0
    cut_after: int | None = None
    """Stream only: abort the connection after this many content chunks (no clean end)."""
    omit_done: bool = False
    """Stream only: end the body cleanly but without ``data: [DONE]``."""
    error_after: int | None = None
    """Stream only: after this many content chunks send an in-band error event, then ``data: [DONE]``."""
    stall_after: int | None = None
    """Stream only: after this many content chunks send nothing more, until the client leaves."""
    hang: bool = False
    """Never send headers, until the client goes away."""


@dataclass
class Received:
    """One request to an inference endpoint, as the fake saw it."""

    method: str
    path: str
    headers: dict[str, str]
    """Lowercased names; a repeated header keeps its last value."""
    raw: bytes
    body: Any
    """The parsed JSON body, or ``raw`` when it is not JSON."""
    stream: bool
    completed: bool = False
    """The whole answer was sent."""
    disconnected: bool = False
    """The client went away before the answer was complete."""


class FakeUpstream(CapacityRoute):
    """A fake OpenAI-compatible server on ``127.0.0.1``; a context manager that starts and stops it.

    Inference requests take the next scripted :class:`Behavior` (``default`` when none is left)
    and are recorded in ``requests``. ``GET /v1/models`` lists ``models`` with status
    ``models_status`` and counts ``probes``.

    Standing in for the cluster, it also serves the capacity route at :data:`CAPACITY_PATH`
    (:class:`~router.testing.capacity.CapacityRoute`).
    """

    def __init__(
        self,
        name: str = "fake",
        *,
        default: Behavior = Behavior(),
        port: int = 0,
        models: Sequence[str] = ("fake-model",),
        prefixes: Sequence[str] = ("",),
    ) -> None:
        super().__init__()
        self.name = name
        self.prefixes = tuple(prefixes)
        """Path prefixes the API is served under (``/m1``: ``/m1/v1/...``, as the cluster's direct path)."""
        self.default = default
        self.models = list(models)
        self.models_status = 200
        self.models_hang = False
        """``GET /v1/models`` never answers (until the client leaves or the fake stops)."""
        self.probes = 0
        self.requests: list[Received] = []
        self.port = port
        self._script: collections.deque[Behavior] = collections.deque()
        self._disconnects = 0
        self._acknowledged = 0
        self._cond = threading.Condition()
        self._thread: ServerThread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing: asyncio.Event | None = None

    @property
    def url(self) -> str:
        """Base URL with the ``/v1`` suffix."""
        return f"http://127.0.0.1:{self.port}/v1"

    def script(self, *behaviors: Behavior) -> None:
        """Queue behaviours, consumed one per inference request."""
        self._script.extend(behaviors)

    def wait_for_disconnect(self, timeout: float) -> bool:
        """Wait until a client abandons a stream or pending request; each abandonment counts once."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._disconnects > self._acknowledged, timeout):
                return False
            self._acknowledged += 1
            return True

    def start(self) -> None:
        """Serve in a background thread; return once the port is bound."""
        logging.getLogger("uvicorn.error").addFilter(QUIET_CUTS)
        config = uvicorn.Config(self, host="127.0.0.1", port=self.port, lifespan="off",
                                log_level="warning", access_log=False, timeout_graceful_shutdown=5)
        self._thread = ServerThread(config, f"fake upstream {self.name}", main=self._serve)
        self.port = self._thread.start()

    def stop(self) -> None:
        """Release pending requests, stop serving and join the thread."""
        if self._thread is None:
            return
        if self._loop is not None and self._closing is not None:
            self._loop.call_soon_threadsafe(self._closing.set)
        self._thread.stop()
        self._thread = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    async def _serve(self, server: uvicorn.Server) -> None:
        self._loop = asyncio.get_running_loop()
        self._closing = asyncio.Event()
        await server.serve()

    def _note_disconnect(self, received: Received) -> None:
        received.disconnected = True
        with self._cond:
            self._disconnects += 1
            self._cond.notify_all()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        method = scope["method"]
        if self.capacity is not None and scope["path"].startswith(CAPACITY_PATH):
            await self._capacity(scope["path"], method, receive, send)
            return
        path = next((scope["path"][len(p):] for p in self.prefixes if scope["path"].startswith(p + "/v1/")), "")
        if path == "/v1/models" and method == "GET":
            self.probes += 1
            if self.models_hang:
                await self._hang(receive)
                return
            data = [{"id": m, "object": "model", "created": 0, "owned_by": self.name} for m in self.models]
            ok = self.models_status == 200
            body = json.dumps({"object": "list", "data": data}).encode() if ok else error_body(
                self.models_status, f"{self.name}: models unavailable")
            await send_body(send, self.models_status, body)
            return
        kind = _ENDPOINTS.get(path)
        if kind is None or method != "POST":
            status = 404 if kind is None else 405
            await send_body(send, status, error_body(status, f"{method} {scope['path']} is not served here"))
            return
        await self._inference(kind, scope, receive, send)

    async def _hang(self, receive: Receive) -> None:
        """Answer nothing until the client leaves or the fake stops (then drop the connection)."""
        if await self._until_gone(asyncio.get_running_loop().create_future(), receive) == "closing":
            raise Cut(f"fake upstream {self.name} stopping")

    async def _until_gone(self, work: Awaitable[None], receive: Receive) -> str:
        """Run `work` until it ends, the client leaves or the fake stops: ``done``, ``gone`` or ``closing``.

        `work` is cancelled unless it ended; its exception (e.g. a Cut) propagates.
        """
        assert self._closing is not None
        answer = asyncio.ensure_future(work)
        gone = asyncio.create_task(until_disconnect(receive))
        closing = asyncio.create_task(self._closing.wait())
        try:
            await asyncio.wait((answer, gone, closing), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            answer.cancel()
            raise
        finally:
            gone.cancel()
            closing.cancel()
        if answer.done():
            answer.result()
            return "done"
        answer.cancel()
        return "gone" if gone.done() else "closing"

    async def _inference(self, kind: str, scope: Scope, receive: Receive, send: Send) -> None:
        raw = await read_body(receive)
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = raw
        request = body if isinstance(body, dict) else {}
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        stream = kind != "embed" and request.get("stream") is True
        received = Received(scope["method"], scope["path"], headers, raw, body, stream)
        self.requests.append(received)
        behavior = self._script.popleft() if self._script else self.default
        # A Cut from the answer propagates to uvicorn, which then drops the connection.
        outcome = await self._until_gone(self._answer(kind, behavior, request, received, send), receive)
        if outcome == "done":
            return
        if outcome == "gone" and not received.completed:
            self._note_disconnect(received)
            return
        raise Cut(f"fake upstream {self.name} stopping")

    async def _answer(self, kind: str, behavior: Behavior, request: dict[str, Any], received: Received,
                      send: Send) -> None:
        if behavior.hang:
            await asyncio.Future()
        if behavior.delay_before_headers_s:
            await asyncio.sleep(behavior.delay_before_headers_s)
        if behavior.body is not None or behavior.status != 200:
            body = behavior.body or error_body(behavior.status, f"{self.name}: scripted {behavior.status}")
            received.completed = True
            await send_body(send, behavior.status, body, behavior.headers)
        elif received.stream:
            await self._stream(kind, behavior, request, received, send)
        else:
            if behavior.chunk_delay_s:
                await asyncio.sleep(behavior.chunk_delay_s * behavior.chunks)
            received.completed = True
            await send_body(send, 200, self._complete(kind, behavior, request), behavior.headers)

    def _complete(self, kind: str, behavior: Behavior, request: dict[str, Any]) -> bytes:
        model, n = request.get("model", "fake-model"), len(self.requests)
        if kind == "embed":
            inputs = request.get("input")
            batch = isinstance(inputs, list) and bool(inputs) and not isinstance(inputs[0], int)
            count = len(inputs) if batch and isinstance(inputs, list) else 1
            data = [{"object": "embedding", "index": i, "embedding": [0.125 * (i + 1), -0.5, 0.25, 1.0]}
                    for i in range(count)]
            usage: dict[str, int] = {"prompt_tokens": PROMPT_TOKENS, "total_tokens": PROMPT_TOKENS}
            return json.dumps({"object": "list", "data": data, "model": model, "usage": usage}).encode()
        text = "".join(f"tok{i} " for i in range(behavior.chunks))
        usage = _usage(behavior.chunks)
        if kind == "chat":
            message = {"role": "assistant", "content": text}
            choice: dict[str, Any] = {"index": 0, "message": message, "logprobs": None,
                                      "finish_reason": "stop"}
            head = {"id": f"chatcmpl-{self.name}-{n}", "object": "chat.completion"}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "stop"}
            head = {"id": f"cmpl-{self.name}-{n}", "object": "text_completion"}
        answer = {**head, "created": int(time.time()), "model": model, "choices": [choice], "usage": usage}
        return json.dumps(answer).encode()

    async def _stream(self, kind: str, behavior: Behavior, request: dict[str, Any], received: Received,
                      send: Send) -> None:
        options = request.get("stream_options")
        usage = isinstance(options, dict) and options.get("include_usage") is True
        chat = kind == "chat"
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{self.name}-{len(self.requests)}",
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": request.get("model", "fake-model")}
        prefix = b"data: " + json.dumps(head)[:-1].encode() + b', "choices": ['
        tail = b'], "usage": null}\n\n' if usage else b"]}\n\n"

        def event(text: str | None, finish: str | None = None, first: bool = False) -> bytes:
            if not chat:
                choice: dict[str, Any] = {"index": 0, "text": text or "", "logprobs": None}
            elif finish:
                choice = {"index": 0, "delta": {}, "logprobs": None}
            else:
                choice = {"index": 0, "delta": {"role": "assistant", "content": text} if first
                          else {"content": text}, "logprobs": None}
            choice["finish_reason"] = finish
            return prefix + json.dumps(choice).encode() + tail

        headers = [*response_headers("text/event-stream", behavior.headers), (b"cache-control", b"no-cache")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for i in range(behavior.chunks):
            if behavior.cut_after is not None and i >= behavior.cut_after:
                raise Cut("scripted cut")
            if behavior.stall_after is not None and i >= behavior.stall_after:
                await asyncio.Future()
            if behavior.error_after is not None and i >= behavior.error_after:
                error = json.loads(error_body(500, f"{self.name}: scripted error event"))
                received.completed = True
                await send({"type": "http.response.body", "body": b"data: " + json.dumps(error).encode()
                            + b"\n\ndata: [DONE]\n\n"})
                return
            if behavior.chunk_delay_s:
                await asyncio.sleep(behavior.chunk_delay_s)
            await send({"type": "http.response.body", "body": event(f"tok{i} ", first=i == 0),
                        "more_body": True})
        if behavior.cut_after is not None:
            raise Cut("scripted cut")
        end = [event(None, finish="stop")]
        if usage:
            end.append(prefix + b'], "usage": ' + json.dumps(_usage(behavior.chunks)).encode() + b"}\n\n")
        if not behavior.omit_done:
            end.append(b"data: [DONE]\n\n")
        for part in end[:-1]:
            await send({"type": "http.response.body", "body": part, "more_body": True})
        received.completed = True
        await send({"type": "http.response.body", "body": end[-1]})


def _usage(completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": completion_tokens,
            "total_tokens": PROMPT_TOKENS + completion_tokens}
