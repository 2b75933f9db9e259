"""The capacity route a fake cluster serves (:mod:`router.capacity` documents the contract)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable

from router.asgi import Receive, Send
from router.capacity import RUNNING, WAKE
from router.capacity_config import CapacityConfig
from router.testing.wire import error_body, read_body, send_body

CAPACITY_PATH = CapacityConfig().path
"""Where the fake serves the cluster's capacity route (the default ``cluster.capacity.path``)."""


class CapacityRoute:
    """The capacity route of :class:`router.testing.FakeUpstream`: served while ``capacity`` is set
    (a plain 404 otherwise, as Serve's proxy answers a route it does not have). ``capacity`` is the
    ``models`` mapping it answers (``capacity_reads`` counts them); a wake-up call is recorded in
    ``wakes`` and held until ``capacity`` shows a running replica of its model or its ``hold_s``
    passes, or answered at once with ``wake_status`` when that is not 200."""

    name: str
    _until_gone: Callable[[Awaitable[None], Receive], Awaitable[str]]
    """The fake's: run the work until it ends (``done``), the client leaves or the fake stops."""

    def __init__(self) -> None:
        self.capacity: dict[str, dict[str, int]] | None = None
        self.capacity_reads = 0
        self.wakes: list[str] = []
        self.wake_status = 200
        """Status of a wake-up call; another one answers at once with an OpenAI error."""

    async def _capacity(self, path: str, method: str, receive: Receive, send: Send) -> None:
        assert self.capacity is not None
        if path == CAPACITY_PATH and method == "GET":
            self.capacity_reads += 1
            await send_body(send, 200, json.dumps({"models": self.capacity}).encode())
            return
        if path != f"{CAPACITY_PATH}/{WAKE}" or method != "POST":
            await send_body(send, 404, error_body(404, f"{method} {path} is not served here"))
            return
        call = json.loads(await read_body(receive))
        model, hold_s = call["model"], float(call["hold_s"])
        self.wakes.append(model)
        if self.wake_status != 200:
            await send_body(send, self.wake_status, error_body(self.wake_status, f"{self.name}: scripted"))
            return

        async def hold() -> None:
            end = time.monotonic() + hold_s
            # `capacity` is set by the test's own thread: poll it (an asyncio.Event is not thread-safe).
            while time.monotonic() < end and not self._running(model):  # noqa: ASYNC110
                await asyncio.sleep(0.02)

        if await self._until_gone(hold(), receive) == "done":
            await send_body(send, 200, json.dumps({"model": model, RUNNING: self._running(model)}).encode())

    def _running(self, model: str) -> bool:
        return bool((self.capacity or {}).get(model, {}).get(RUNNING))
