"""The cluster's capacity per model, read from its capacity route, and the wake-up of a model at zero.

The cluster side (:mod:`cluster.capacity`) deploys a small Serve application beside the models at
``cluster.capacity.path`` on the Serve HTTP port (the host and port of ``cluster.url``). It reads
Serve's own state from the Serve controller; the router never talks to Ray's dashboard. The route
is a contract between the two sides:

- ``GET {path}`` -> ``{"models": {<cluster model id>: {"running": n, "starting": n, "target": n,
  "max_ongoing_requests": n}}}``: replicas serving, replicas on their way (pending, starting,
  recovering), and the count Serve's autoscaler currently aims for.
- ``POST {path}/wake`` with ``{"model": <cluster model id>, "hold_s": s}`` holds one call to the
  model's deployment for up to ``s`` seconds. While it waits for a replica it is a queued request in
  a Serve deployment handle, which Serve's autoscaler counts: a deployment at zero replicas with a
  queued request is scaled up at once. It answers ``{"running": true}`` as soon as a replica took
  the call, ``{"running": false}`` when ``s`` passed first.

:class:`CapacityProbe` reads the route with every health probe (``router.probe_interval_s``); a
cluster that does not answer it (an older deployment, an external Ray Serve) leaves the capacity
unknown, and routing is what it was without this module. :class:`Waker` keeps a wake-up call held
for each model that requests arrive for while it has no running replica, and for no other: the
prober never wakes a model.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from router.redaction import redact_url
from router.settings import ClusterConfig, Settings

log = logging.getLogger("openweight.router")

WAKE = "wake"
"""The wake-up call's path under the capacity route."""
RUNNING = "running"
STARTING = "starting"
TARGET = "target"
"""The `state` label values of ``openweight_cluster_replicas`` (and the keys of the route's answer)."""
STATES = (RUNNING, STARTING, TARGET)
MAX_ANSWER_BYTES = 1 << 20
"""Largest answer of the capacity route read; a longer one (or a compressed one) is malformed."""
WAKE_RETRY_S = 1.0
"""Pause before asking again when a wake-up call was not taken (held to its end, refused, failed)."""


@dataclass(frozen=True, slots=True)
class ModelCapacity:
    """One model's replicas as Serve counts them."""

    running: int
    starting: int
    target: int
    max_ongoing_requests: int | None = None
    """Requests one replica takes at once (Serve's ``max_ongoing_requests``), when known."""

    @property
    def cold(self) -> bool:
        """No replica serves: scaled to zero, deploying, or every replica restarting."""
        return self.running == 0

    @property
    def in_flight_limit(self) -> int | None:
        """Requests the running replicas take at once (``running x max_ongoing_requests``)."""
        return None if self.max_ongoing_requests is None else self.running * self.max_ongoing_requests

    def count(self, state: str) -> int:
        """The replica count of one :data:`STATES` value."""
        return {RUNNING: self.running, STARTING: self.starting, TARGET: self.target}[state]


def capacity_url(cluster: ClusterConfig) -> str:
    """The capacity route: ``cluster.capacity.path`` on the scheme, host and port of ``cluster.url``."""
    parts = urlsplit(cluster.url)
    return f"{parts.scheme}://{parts.netloc}{cluster.capacity.path}"


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"not a replica count: {value!r}")
    return value


def parse_capacity(payload: Any, public_names: Mapping[str, str]) -> dict[str, ModelCapacity]:
    """The route's answer keyed by public model name; models the config does not route are left out.

    `public_names` maps cluster model ids to public names. Raises ValueError on a malformed answer.
    """
    models = payload.get("models") if isinstance(payload, dict) else None
    if not isinstance(models, dict):
        raise ValueError("no `models` mapping")
    found: dict[str, ModelCapacity] = {}
    for model_id, entry in models.items():
        name = public_names.get(model_id)
        if name is None:
            continue
        if not isinstance(entry, dict):
            raise ValueError(f"{model_id}: not a mapping")
        limit = entry.get("max_ongoing_requests")
        found[name] = ModelCapacity(
            _count(entry.get(RUNNING)), _count(entry.get(STARTING)), _count(entry.get(TARGET)),
            None if limit is None else _count(limit),
        )
    return found


class CapacityProbe:
    """Reads the capacity route; :attr:`models` is what the policy sees (empty when unknown)."""

    def __init__(self, settings: Settings) -> None:
        self._url = capacity_url(settings.cluster)
        self._timeout_s = settings.cluster.connect_timeout_s + 3.0
        self._public = {settings.cluster_model_id(name): name for name in settings.models}
        self._session: aiohttp.ClientSession | None = None
        self.models: dict[str, ModelCapacity] = {}
        self.answered: bool | None = None
        """Whether the last read got a well-formed answer (None before the first read)."""
        self.before_refresh: Callable[[], None] | None = None
        """Called before each read, while :attr:`models` still holds the previous counts."""

    @property
    def url(self) -> str:
        return self._url

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            # Answers are read as sent (bounded, never inflated): the route is JSON in identity coding.
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=4), auto_decompress=False,
                                                  headers={"accept-encoding": "identity"})
        return self._session

    async def refresh(self) -> None:
        """Read the route once. No answer, or a malformed one, makes the capacity unknown (empty)."""
        if self.before_refresh is not None:
            self.before_refresh()
        try:
            async with self._client().get(self._url, timeout=aiohttp.ClientTimeout(total=self._timeout_s)) as r:
                payload = await _json(r)
            self.models = parse_capacity(payload, self._public) if payload is not None else {}
            self.answered = payload is not None
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            if self.answered:
                log.warning("capacity route %s: %s; capacity unknown until it answers", redact_url(self._url),
                            type(exc).__name__)
            self.models, self.answered = {}, False

    def idle(self, model_id: str) -> bool:
        """The route says no replica of the cluster model `model_id` runs (False while unknown)."""
        name = self._public.get(model_id)
        capacity = self.models.get(name) if name is not None else None
        return capacity is not None and capacity.cold

    async def wake(self, model_id: str, hold_s: float) -> bool:
        """Hold one wake-up call for `model_id` up to `hold_s` s; whether a replica took it."""
        timeout = aiohttp.ClientTimeout(total=hold_s + self._timeout_s)
        body = {"model": model_id, "hold_s": hold_s}
        async with self._client().post(f"{self._url}/{WAKE}", json=body, timeout=timeout) as r:
            answer = await _json(r)
        return isinstance(answer, dict) and answer.get(RUNNING) is True

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


async def _json(response: aiohttp.ClientResponse) -> Any:
    """A 200 answer's JSON (None for another status); ValueError when it is not JSON in
    :data:`MAX_ANSWER_BYTES` (compressed, cut off, too long)."""
    if response.status != 200:
        return None
    body = bytearray()
    async for chunk in response.content.iter_any():
        body += chunk
        if len(body) > MAX_ANSWER_BYTES:
            raise ValueError(f"answer over {MAX_ANSWER_BYTES} bytes")
    return json.loads(body)


class Waker:
    """One held wake-up call per model in demand at zero, repeated until `hold_s` after its last request."""

    def __init__(
        self, probe: CapacityProbe, settings: Settings, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._probe = probe
        self._settings = settings
        self._hold_s = settings.cluster.capacity.wake_hold_s
        self._clock = clock
        self._demand: dict[str, float] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.calls = 0
        """Wake-up calls sent, all models together."""

    def demand(self, model: str) -> None:
        """A request for `model` (public name) met no running replica: keep Serve starting one."""
        self._demand[model] = self._clock()
        if model not in self._tasks:
            self._tasks[model] = asyncio.create_task(self._hold(model))

    def waking(self, model: str) -> bool:
        return model in self._tasks

    async def _hold(self, model: str) -> None:
        try:
            model_id = self._settings.cluster_model_id(model)
            while True:
                left = self._demand[model] + self._hold_s - self._clock()
                capacity = self._probe.models.get(model)
                if left <= 0 or (capacity is not None and not capacity.cold):
                    return
                self.calls += 1
                try:
                    if await self._probe.wake(model_id, max(1.0, math.ceil(left))):
                        return
                except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                    log.warning("wake-up call for %s failed: %s", model, type(exc).__name__)
                # Not taken: held to its end, or refused at once (a route without wake-ups): pause.
                await asyncio.sleep(WAKE_RETRY_S)
        finally:
            self._tasks.pop(model, None)

    async def aclose(self) -> None:
        """Cancel every held call (router shutdown)."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
