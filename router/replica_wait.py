"""Waiting for a replica: a request that only the cluster may serve while no replica of its model runs.

``self_hosted_only`` models, and models whose providers are all unavailable, cannot be covered while
the cluster scales from zero. Their requests wait for the capacity route to report a running
replica (the wake-up call is held meanwhile, see :class:`router.capacity.Waker`), at most
``router.deadline_s``. A streaming client's response starts at once and gets the SSE comment
``: waiting for a replica`` every ``cluster.capacity.waiting_comment_interval_s`` (comments are
ignored by SSE clients, and keep proxies from timing an idle connection out); when the deadline
passes it ends with an in-band error event. A non-streaming client gets 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable

from router.asgi import Message, Request, Send
from router.errors import UpstreamUnavailable
from router.health import Health
from router.settings import Settings

WAITING_COMMENT = b": waiting for a replica\n\n"
"""The SSE comment a waiting stream gets (the issue's contract: proxies and clients may match it)."""
POLL_S = 0.1
"""How often the capacity snapshot (refreshed by the prober) is looked at while waiting."""
_STREAM_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


class NoReplica(UpstreamUnavailable):
    """No replica of the model started within the request's deadline, and no provider may serve it."""


def _replica_runs(health: Health, model: str) -> bool:
    capacity = health.snapshot().capacity.get(model)
    return capacity is None or not capacity.cold  # unknown again: route as without capacity


async def wait_for_replica(
    request: Request, model: str, stream: bool, health: Health, settings: Settings,
    clock: Callable[[], float],
) -> None:
    """Return once a replica of `model` runs; raise :class:`NoReplica` when the deadline passes first.

    A stream's response is started here with the waiting comments; the answer's own
    ``http.response.start`` is then dropped (see :func:`_after_start`), so the client sees one stream.
    """
    deadline = clock() + settings.router.deadline_s
    interval = settings.cluster.capacity.waiting_comment_interval_s
    next_comment = clock()
    while not _replica_runs(health, model):
        now = clock()
        if now >= deadline:
            retry = max(1, math.ceil(settings.router.probe_interval_s))
            raise NoReplica(
                f"no replica of model {model!r} started within {settings.router.deadline_s:g} s and no "
                "provider may serve it",
                headers={"retry-after": str(retry), "x-openweight-upstream": "none"},
            )
        if stream and now >= next_comment:
            if not request.started_response:
                await _start_stream(request)
            await request.send({"type": "http.response.body", "body": WAITING_COMMENT, "more_body": True})
            next_comment = now + interval
        await asyncio.sleep(min(POLL_S, max(0.0, deadline - now)))


async def _start_stream(request: Request) -> None:
    headers = [*_STREAM_HEADERS, (b"x-request-id", request.request_id.encode())]
    await request.send({"type": "http.response.start", "status": 200, "headers": headers})
    request.started_response = True
    request.send = _after_start(request.send)


def _after_start(send: Send) -> Send:
    """`send` for a response already started: the answer's own start is dropped, its body goes on."""

    async def forward(message: Message) -> None:
        if message["type"] != "http.response.start":
            await send(message)

    return forward
