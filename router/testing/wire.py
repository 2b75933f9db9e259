"""The fake upstream's HTTP plumbing: OpenAI-style error bodies, whole-body answers, request bodies,
and the exception that drops a connection."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping

from router.asgi import Receive, Send

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 408: "timeout", 413: "invalid_request_error",
                429: "rate_limit_exceeded"}


class Cut(Exception):
    """Raised inside the app to make uvicorn drop the connection."""


class QuietCuts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], Cut))


QUIET_CUTS = QuietCuts()


def error_body(status: int, message: str) -> bytes:
    """An OpenAI-style error body for `status`."""
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    error = {"message": message, "type": kind, "param": None, "code": None}
    return json.dumps({"error": error}).encode()


def response_headers(content_type: str, extra: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
    """ASGI headers: `content_type`, then `extra` (lower-cased names)."""
    headers = {"content-type": content_type, **{k.lower(): v for k, v in extra.items()}}
    return [(k.encode(), v.encode()) for k, v in headers.items()]


async def send_body(send: Send, status: int, body: bytes, headers: Mapping[str, str] = {}) -> None:
    """Answer with a whole JSON body."""
    raw = [*response_headers("application/json", headers), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


async def read_body(receive: Receive) -> bytes:
    """The request's whole body; :class:`Cut` when the client leaves first."""
    parts = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Cut("client left while sending the body")
        parts.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(parts)
