"""A uvicorn server in a background thread: the fake upstreams and the tests' routers run this way."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable

import uvicorn


class ServerThread:
    """A uvicorn server on an event loop of its own (uvloop) in a daemon thread.

    :meth:`start` returns the port once the server listens; :meth:`stop` asks it to exit and joins
    the thread. ``main`` (default: ``server.serve()``) runs on that loop instead, to set up what
    must live there first. uvicorn installs no signal handlers outside the main thread.
    """

    def __init__(self, config: uvicorn.Config, name: str, *,
                 main: Callable[[uvicorn.Server], Awaitable[None]] | None = None) -> None:
        self.name = name
        self.server = uvicorn.Server(config)
        self._main = main
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self, timeout_s: float = 10.0) -> int:
        """Start serving; the bound port (:class:`RuntimeError` when it does not listen in time)."""
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                config = self.server.config
                raise RuntimeError(f"{self.name} did not start on {config.host}:{config.port}")
            time.sleep(0.002)
        return int(self.server.servers[0].sockets[0].getsockname()[1])

    def stop(self, timeout_s: float = 10.0) -> None:
        """Ask the server to exit (it drains within its graceful-shutdown timeout) and join the thread."""
        self.server.should_exit = True
        self._thread.join(timeout_s)

    def _run(self) -> None:
        try:
            import uvloop
            factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
        except ImportError:  # pragma: no cover
            factory = None
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(self._serve())

    async def _serve(self) -> None:
        await (self._main(self.server) if self._main is not None else self.server.serve())
