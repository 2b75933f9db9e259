"""ASGI types and the request as the router's handlers see it.

As starlette's ``types.py``, the aliases that every ASGI callable in this repository is typed with:
the router's app, its server, the fake upstream (:mod:`router.testing`) and the benchmark's floor
proxy. Below them, :class:`Request`, one HTTP request with the reading and answering the router's
endpoints need. This module depends on nothing of the router but its error tree, so that the
server, the endpoints and the app can all import it without importing each other.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from router.errors import ClientDisconnected, OpenWeightError, PayloadTooLarge

Message = dict[str, Any]
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

REQUEST_FAILED = "openweight.request_failed"
"""Set in a request's ASGI scope to the error its body met (late, malformed): the app answers it.

The server (:mod:`router.server`) sets it; :meth:`Request.read_body` raises it.
"""


async def until_disconnect(receive: Receive) -> None:
    """Return once the client has gone (``http.disconnect``), discarding whatever else arrives."""
    while (await receive())["type"] != "http.disconnect":
        pass


@dataclass(slots=True)
class Request:
    """One HTTP request as the endpoints see it."""

    scope: Scope
    receive: Receive
    send: Send
    request_id: str
    start: float = field(default_factory=time.perf_counter)
    started_response: bool = False

    def header(self, name: bytes) -> str | None:
        """The first value of the header `name` (lowercase bytes), or None."""
        for key, value in self.scope["headers"]:
            if key == name:
                return str(value.decode("latin-1"))
        return None

    async def read_body(self, limit: int) -> bytes:
        """The whole body, refusing more than `limit` bytes (before reading them when declared)."""
        declared = self.header(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"the request body exceeds the limit of {limit} bytes")
        parts: list[bytes] = []
        size = 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnected("the client closed the connection while sending its request")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"the request body exceeds the limit of {limit} bytes")
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)
            if (failed := self.scope.get(REQUEST_FAILED)) is not None:  # the server found the rest late or malformed
                raise failed

    async def respond(self, status: int, body: bytes, headers: dict[str, str] | None = None,
                      content_type: str = "application/json") -> None:
        """Send a whole response: `body` with its length, the request id and `headers`."""
        raw = [
            (b"content-type", content_type.encode()),
            (b"content-length", str(len(body)).encode()),
            (b"x-request-id", self.request_id.encode()),
        ]
        raw.extend((k.encode(), v.encode()) for k, v in (headers or {}).items())
        self.started_response = True
        await self.send({"type": "http.response.start", "status": status, "headers": raw})
        await self.send({"type": "http.response.body", "body": body})

    async def respond_json(self, status: int, payload: object) -> None:
        await self.respond(status, json.dumps(payload).encode())

    async def respond_error(self, error: OpenWeightError) -> None:
        """The error as OpenAI-format JSON, with its status and headers."""
        await self.respond(error.status, error.body(), error.headers)
