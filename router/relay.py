"""Relay a committed upstream answer to the client over ASGI.

Streams go through chunk by chunk. Bytes are only held back up to the end of the current
server-sent event, so a client never receives half an event; that is also where `[DONE]` and the
usage chunk are recognised. A stream that breaks, or ends without `[DONE]`, is closed with an
OpenAI-style error event followed by `data: [DONE]`, never silently truncated.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from router.dispatch import Committed
from router.errors import SHUTDOWN_MESSAGE, UpstreamError
from router.metrics import RequestObserver

log = logging.getLogger("openweight.router")


class Responder(Protocol):
    """Where the answer goes: the ASGI `send` of one request, and whether a response has started."""

    started_response: bool

    @property
    def send(self) -> Callable[[dict[str, Any]], Awaitable[None]]: ...

    @property
    def request_id(self) -> str: ...


_DONE = b"[DONE]"
_DONE_LINES = (b"data: [DONE]", b"data:[DONE]")
_EVENT_END = b"\n\n"


def _ends_stream(data: bytes) -> bool:
    """Whether `data` holds the `data: [DONE]` event: a line of its own, not those bytes inside a chunk's text."""
    at = data.find(_DONE)
    while at >= 0:
        end = at + len(_DONE)
        for line in _DONE_LINES:
            start = end - len(line)
            if start >= 0 and data.startswith(line, start) and (start == 0 or data[start - 1] == 0x0A):
                return True
        at = data.find(_DONE, end)
    return False


def usage_of(payload: object) -> tuple[int, int] | None:
    """(prompt, completion) tokens of a decoded response or chunk that carries `usage`."""
    if not isinstance(payload, dict):
        return None
    usage = payload.get("usage")
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    return (
        prompt if isinstance(prompt, int) else 0,
        completion if isinstance(completion, int) else 0,
    )


_USAGE_KEY = b'"usage"'
_OBJECT_VALUE = re.compile(rb"\s*:\s*\{")


def _usage_at(data: bytes, start: int = 0) -> int:
    """Where a `"usage"` key with an object value is in `data`, from `start`; -1 when none.

    Most chunks carry `"usage": null`: plain searches find the key, and only its value is matched,
    so a chunk costs no regular-expression scan. (Inside a JSON string the quotes are escaped, so
    generated text never looks like the key.)
    """
    at = data.find(_USAGE_KEY, start)
    while at >= 0:
        after = at + len(_USAGE_KEY)
        if _OBJECT_VALUE.match(data, after):
            return at
        at = data.find(_USAGE_KEY, after)
    return -1


class SseTracker:
    """Follows an OpenAI server-sent event stream: whole events out, `[DONE]` and usage noted."""

    __slots__ = ("_pending", "done", "strip_usage", "usage")

    def __init__(self, strip_usage: bool) -> None:
        self.strip_usage = strip_usage
        self.usage: tuple[int, int] | None = None
        self.done = False
        self._pending = b""

    def feed(self, chunk: bytes) -> bytes:
        """The complete events in `chunk` (plus what was held back), ready to forward."""
        data = self._pending + chunk if self._pending else chunk
        if b"\r\n" in data:
            data = data.replace(b"\r\n", b"\n")
        end = data.rfind(_EVENT_END)
        if end < 0:
            self._pending = data
            return b""
        end += len(_EVENT_END)
        if end == len(data):  # the usual case: the chunk ends with an event; no copies
            complete, self._pending = data, b""
        else:
            complete, self._pending = data[:end], data[end:]
        if _DONE in complete and _ends_stream(complete):
            self.done = True
        at = _usage_at(complete)  # most chunks carry the key (`"usage": null`): one search, not two
        if at >= 0:
            complete = self._take_usage(complete, at)
        return complete

    def _take_usage(self, complete: bytes, at: int) -> bytes:
        """Note the usage of each event that carries one (the first at `at`) and drop the usage-only
        chunk that was asked for on the client's behalf; every other byte passes as it is."""
        kept: list[bytes] = []
        settled = 0  # complete[:settled] is either in `kept` or dropped
        while at >= 0:
            start = complete.rfind(_EVENT_END, settled, at)
            start = settled if start < 0 else start + len(_EVENT_END)
            end = complete.find(_EVENT_END, at) + len(_EVENT_END)  # `complete` ends with an event's end
            if self._note_usage(complete[start:end - len(_EVENT_END)]):
                kept.append(complete[settled:start])
                settled = end
            at = _usage_at(complete, end)
        if not settled:
            return complete
        kept.append(complete[settled:])
        return b"".join(kept)

    def _note_usage(self, event: bytes) -> bool:
        """Record the usage an event carries; whether it is the usage-only chunk to strip."""
        if not event.startswith(b"data:"):
            return False
        try:
            payload = json.loads(event[5:])
        except ValueError:
            return False
        usage = usage_of(payload)
        if usage is None:
            return False
        self.usage = usage
        return self.strip_usage and isinstance(payload, dict) and payload.get("choices") == []


def error_event(message: str) -> bytes:
    """An in-band OpenAI-style error, then the end of the stream."""
    error = {"message": message, "type": "upstream_error", "param": None, "code": "stream_interrupted"}
    return b"data: " + json.dumps({"error": error}).encode() + b"\n\ndata: [DONE]\n\n"


def response_headers(committed: Committed, request_id: str) -> list[tuple[bytes, bytes]]:
    upstream = committed.response.headers
    headers = [
        (b"content-type", upstream.get("content-type", "application/json").encode("latin-1")),
        (b"x-openweight-upstream", committed.target.upstream.encode()),
        (b"x-openweight-attempts", str(committed.attempts).encode()),
        (b"x-request-id", request_id.encode()),
    ]
    if "content-encoding" in upstream:
        headers.append((b"content-encoding", upstream["content-encoding"].encode("latin-1")))
    return headers


async def relay(client: Responder, committed: Committed, observer: RequestObserver, *, strip_usage: bool) -> int:
    """Send the committed answer to the client; returns the status sent.

    A non-streamed answer is read whole before anything is sent, so an upstream that breaks while
    sending it raises :class:`UpstreamError` with no response started (the client gets a 502 JSON).
    """
    send, request_id = client.send, client.request_id
    response = committed.response
    headers = response_headers(committed, request_id)
    event_stream = response.status < 300 and response.headers.get("content-type", "").startswith(
        "text/event-stream"
    )
    if not event_stream:
        body = await response.aread()
        if response.status < 300 and b'"usage"' in body:
            try:
                usage = usage_of(json.loads(body))
            except ValueError:
                usage = None
            if usage is not None:
                observer.usage(*usage)
        headers.append((b"content-length", str(len(body)).encode()))
        client.started_response = True
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        observer.first_byte()
        await send({"type": "http.response.body", "body": body})
        return response.status

    headers.append((b"cache-control", b"no-cache"))
    client.started_response = True
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    tracker = SseTracker(strip_usage)
    failure: str | None = None
    out = tracker.feed(response.first_chunk)
    if out:
        observer.first_byte()
        await send({"type": "http.response.body", "body": out, "more_body": True})
    try:
        while chunk := await response.read_chunk():
            out = tracker.feed(chunk)
            if out:
                observer.first_byte()
                await send({"type": "http.response.body", "body": out, "more_body": True})
    except UpstreamError as exc:
        failure = f"the upstream stream broke: {exc.message}"
    except asyncio.CancelledError:
        # The client left (then this send does nothing) or the router's shutdown grace ran out:
        # either way the stream ends as a stream, not as a cut connection.
        await send({"type": "http.response.body", "body": error_event(SHUTDOWN_MESSAGE), "more_body": False})
        raise
    if failure is None and not tracker.done:
        failure = f"{committed.target.upstream}: the upstream stream ended without [DONE]"
    if tracker.usage is not None:
        observer.usage(*tracker.usage)
    if failure is not None:
        log.warning("request %s: %s", request_id, failure)
        observer.stream_error()
        await send({"type": "http.response.body", "body": error_event(failure), "more_body": False})
    else:
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    return response.status
