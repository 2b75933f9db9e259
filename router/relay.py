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
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from router.dispatch import Committed
from router.errors import SHUTDOWN_MESSAGE, UpstreamError, UpstreamProtocolError
from router.metrics import NONE, RESUME_FAILED, RESUME_SUCCESS, RequestObserver
from router.resume import Delivered, Resumer
from router.schemas import usage_of
from router.upstreams.base import UpstreamResponse

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
MAX_EVENT_BYTES = 4 << 20
"""Largest server-sent event relayed; a longer one is a broken stream."""


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
        """The complete events in `chunk` (plus what was held back), ready to forward.

        Line ends are forwarded as ``\\n`` whichever of CRLF, LF or a bare CR (all three are SSE
        line ends) the upstream used.
        """
        data = self._pending + chunk if self._pending else chunk
        held_cr = b""
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
            if data.endswith(b"\r"):  # maybe half of a CRLF whose LF is in the next chunk
                data, held_cr = data[:-1], b"\r"
            data = data.replace(b"\r", b"\n")
        end = data.rfind(_EVENT_END)
        if end < 0:
            if len(data) > MAX_EVENT_BYTES:  # never ends: holding (and searching) it would grow without bound
                raise UpstreamProtocolError(f"an event of more than {MAX_EVENT_BYTES} bytes")
            self._pending = data + held_cr
            return b""
        end += len(_EVENT_END)
        if end == len(data) and not held_cr:  # the usual case: the chunk ends with an event; no copies
            complete, self._pending = data, b""
        else:
            complete, self._pending = data[:end], data[end:] + held_cr
        if _DONE in complete and _ends_stream(complete):
            self.done = True
        at = _usage_at(complete)  # most chunks carry the key (`"usage": null`): one search, not two
        if at >= 0:
            complete = self._take_usage(complete, at)
        return complete

    def finish(self) -> bytes:
        """At the end of the body: what a held-back CR completes, and a last ``data: [DONE]`` that
        lacked its blank line (the upstream closed right after it), completed. Any other unfinished
        event is dropped."""
        out = b""
        if self._pending.endswith(b"\r"):  # held back in case an LF followed; at the end it is a line end
            self._pending = self._pending[:-1] + b"\n"
            out = self.feed(b"")
        rest = self._pending.rstrip(b"\n")
        self._pending = b""
        if rest in _DONE_LINES:
            self.done = True
            out += rest + _EVENT_END
        return out

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
    """The headers the client gets: the upstream's content type (checked at the upstream) and ours."""
    return [
        (b"content-type", committed.response.headers.get("content-type", "application/json").encode("latin-1")),
        (b"x-openweight-upstream", committed.target.upstream.encode()),
        (b"x-openweight-attempts", str(committed.attempts).encode()),
        (b"x-request-id", request_id.encode()),
    ]


async def relay(client: Responder, committed: Committed, observer: RequestObserver, *, strip_usage: bool,
                resumer: Resumer | None = None) -> int:
    """Send the committed answer to the client; returns the status sent.

    A stream that breaks is continued through `resumer` when it is given and the break allows it;
    otherwise it ends with an in-band error event and `data: [DONE]`.

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
        body = response.redact(await response.aread())
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
    try:
        failure = await _stream(client, committed, observer, strip_usage, resumer)
    except asyncio.CancelledError:
        # The client left (then this send does nothing) or the router's shutdown grace ran out:
        # either way the stream ends as a stream, not as a cut connection.
        await send({"type": "http.response.body", "body": error_event(SHUTDOWN_MESSAGE), "more_body": False})
        raise
    if failure is not None:
        log.warning("request %s: %s", request_id, failure)
        observer.stream_error()
        await send({"type": "http.response.body", "body": error_event(failure), "more_body": False})
    else:
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    return response.status


async def _stream(client: Responder, committed: Committed, observer: RequestObserver, strip_usage: bool,
                  resumer: Resumer | None) -> str | None:
    """Relay a stream, continuing it through `resumer` each time it breaks and may be continued.

    Returns why it ended broken, or None when it ended with `[DONE]`.
    """
    sent: list[bytes] | None = [] if resumer is not None else None  # what the client has, to continue from
    part = _Part(committed.target.upstream, committed.response, None, None)
    continuations: list[Committed] = []
    try:
        while True:
            part_start = len(sent) if sent is not None else 0
            tracker = SseTracker(strip_usage)
            failure = await _pump(client.send, part, tracker, observer, sent)
            if failure is not None and resumer is not None and sent is not None:
                delivered = Delivered.read(resumer.endpoint, b"".join(sent))
                why_not = resumer.why_not(delivered, part.upstream)
                if why_not is None:
                    following = await _continue(client, resumer, delivered, part, failure, tracker.usage,
                                                sent[part_start:], observer, continuations)
                    if isinstance(following, str):
                        return following
                    part = following
                    continue
                failure = f"{failure} (not continued: {why_not})"
            if tracker.usage is not None:
                observer.usage(*tracker.usage, upstream=part.upstream)
            return failure
    finally:
        for continuation in continuations:
            continuation.release()
            await continuation.response.aclose()


async def _continue(client: Responder, resumer: Resumer, delivered: Delivered, broken: _Part, failure: str,
                    usage: tuple[int, int] | None, part_sent: list[bytes], observer: RequestObserver,
                    continuations: list[Committed]) -> _Part | str:
    """The part that continues `broken`, after counting the usage of `broken` (estimated from its
    text events when its upstream streamed none); why the stream ends when no upstream takes it."""
    used = usage or (0, Delivered.read(resumer.endpoint, b"".join(part_sent)).content_events)
    observer.usage(*used, upstream=broken.upstream, estimated=usage is None)
    try:
        resumed = await resumer.resume(delivered, broken.upstream, used)
    except UpstreamError as exc:
        observer.stream_resume(broken.upstream, NONE, RESUME_FAILED)
        return f"{failure}; no upstream could continue it: {exc.message}"
    to = resumed.committed.target.upstream
    observer.stream_resume(broken.upstream, to, RESUME_SUCCESS)
    log.info("request %s: %s; continued on %s", client.request_id, failure, to)
    continuations.append(resumed.committed)
    return _Part(to, resumed.committed.response, resumed.rewrite, resumed.gap_started)


class _Part:
    """One upstream's part of a client's stream."""

    __slots__ = ("gap_started", "response", "rewrite", "upstream")

    def __init__(self, upstream: str, response: UpstreamResponse, rewrite: Callable[[bytes], bytes] | None,
                 gap_started: float | None) -> None:
        self.upstream = upstream
        self.response = response
        self.rewrite = rewrite
        """Makes a continuation's events part of the first part's stream (None for the first part)."""
        self.gap_started = gap_started
        """When the part before it broke (the pause the client sees ends with this part's first byte)."""


async def _pump(send: Callable[[dict[str, Any]], Awaitable[None]], part: _Part, tracker: SseTracker,
                observer: RequestObserver, sent: list[bytes] | None) -> str | None:
    """Forward one part's events; why it broke, or None when it ended with `[DONE]`.

    With `sent` (the stream may be continued), an upstream's in-band error event is a break too,
    and everything forwarded is kept there.
    """
    response = part.response
    chunk = response.first_chunk
    try:
        while True:
            out = tracker.feed(chunk) if chunk else b""
            if not chunk:
                out = tracker.finish()
            if out:
                broke: str | None = None
                if sent is not None and _ERROR_KEY in out:
                    out, broke = _until_error_event(out)
                out = response.redact(out)
                if part.rewrite is not None:
                    out = part.rewrite(out)
                if out:
                    observer.first_byte()
                    if part.gap_started is not None:
                        observer.resume_gap(time.perf_counter() - part.gap_started)
                        part.gap_started = None
                    if sent is not None:
                        sent.append(out)
                    await send({"type": "http.response.body", "body": out, "more_body": True})
                if broke is not None:
                    return f"{part.upstream}: {broke}"
            if not chunk:
                break
            chunk = await response.read_chunk()
    except UpstreamError as exc:
        return f"the upstream stream broke: {exc.message}"
    if not tracker.done:
        return f"{part.upstream}: the upstream stream ended without [DONE]"
    return None


_ERROR_KEY = b'"error"'


def _until_error_event(events: bytes) -> tuple[bytes, str | None]:
    """`events` up to an in-band error event (``data: {"error": ...}``), and its message; all of
    them and None when there is none."""
    at = 0
    while at < len(events):
        end = events.find(_EVENT_END, at) + len(_EVENT_END)
        event = events[at:end]
        if _ERROR_KEY in event and event.startswith(b"data:"):
            try:
                payload = json.loads(event[5:])
            except ValueError:
                payload = None
            if isinstance(payload, dict) and "error" in payload:
                error = payload["error"]
                message = error.get("message") if isinstance(error, dict) else None
                return events[:at], f"an error event in the stream ({str(message)[:200] if message else 'no message'})"
        at = end
    return events, None
