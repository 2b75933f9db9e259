"""Upstream health: a circuit breaker per upstream, fed by request outcomes and a background prober.

The policy never touches breakers: it reads an immutable :class:`HealthSnapshot`. The dispatcher
reports outcomes and, for a half-open circuit, claims its single trial slot before an attempt.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum

from router.capacity import CapacityProbe, ModelCapacity
from router.settings import CircuitConfig
from router.upstreams.base import Upstream


class CircuitState(IntEnum):
    """The values of the openweight_circuit_state gauge."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class Breaker:
    """Closed -> open after `failure_threshold` consecutive failures; open -> half-open after
    `reset_timeout_s` (or at once when a probe succeeds); half-open lets one trial request through
    and closes after `success_threshold` successes, or opens again on a failure."""

    def __init__(self, config: CircuitConfig, clock: Callable[[], float]) -> None:
        self.config = config
        self._clock = clock
        self._state = CircuitState.CLOSED
        self._failures = 0
        self._successes = 0
        self._opened_at = 0.0
        self._trial_in_flight = False
        self.deferred_until = 0.0
        """An upstream's Retry-After: it is not sent new requests before this time."""
        self.probe_ok: bool | None = None

    @property
    def state(self) -> CircuitState:
        if (
            self._state is CircuitState.OPEN
            and self._clock() - self._opened_at >= self.config.reset_timeout_s
        ):
            self._state = CircuitState.HALF_OPEN
            self._successes = 0
        return self._state

    def reopens_in_s(self) -> float:
        """Seconds until an open circuit turns half-open (0 when it is not open)."""
        if self.state is not CircuitState.OPEN:
            return 0.0
        return max(0.0, self._opened_at + self.config.reset_timeout_s - self._clock())

    def acquire(self) -> bool:
        """Whether a request may be sent now; a half-open circuit admits one trial at a time."""
        state = self.state
        if state is CircuitState.CLOSED:
            return True
        if state is CircuitState.HALF_OPEN and not self._trial_in_flight:
            self._trial_in_flight = True
            return True
        return False

    def release(self) -> None:
        """The attempt admitted by :meth:`acquire` ended without an outcome (e.g. cancelled)."""
        self._trial_in_flight = False

    def success(self) -> None:
        self._trial_in_flight = False
        self._failures = 0
        if self.state is CircuitState.HALF_OPEN:
            self._successes += 1
            if self._successes >= self.config.success_threshold:
                self._state = CircuitState.CLOSED
        elif self._state is CircuitState.OPEN:
            self._state = CircuitState.HALF_OPEN

    def failure(self) -> None:
        self._trial_in_flight = False
        self._failures += 1
        state = self.state
        if state is CircuitState.HALF_OPEN or (
            state is CircuitState.CLOSED and self._failures >= self.config.failure_threshold
        ):
            self._state = CircuitState.OPEN
            self._opened_at = self._clock()

    def defer(self, seconds: float) -> None:
        self.deferred_until = max(self.deferred_until, self._clock() + seconds)

    def probed(self, ok: bool) -> None:
        """A probe result: success lets an open circuit try at once, failure counts as a failure."""
        self.probe_ok = ok
        if not ok:
            self.failure()
        elif self._state is CircuitState.OPEN:
            self._state = CircuitState.HALF_OPEN
            self._successes = 0


@dataclass(frozen=True, slots=True)
class UpstreamHealth:
    state: CircuitState
    deferred: bool
    probe_ok: bool | None

    @property
    def up(self) -> bool:
        """Not known dead: circuit not open and the last probe (if any) answered."""
        return self.state is not CircuitState.OPEN and self.probe_ok is not False


@dataclass(frozen=True, slots=True)
class HealthSnapshot:
    """What the policy may know: per-upstream health, the cluster's in-flight counts and its capacity."""

    upstreams: Mapping[str, UpstreamHealth]
    cluster_in_flight: int
    cluster_in_flight_by_model: Mapping[str, int]
    capacity: Mapping[str, ModelCapacity] = field(default_factory=dict)
    """Replicas per model (public name) from the capacity route; empty while unknown."""


class Health:
    """All breakers, the in-flight counts towards the cluster and the background prober."""

    def __init__(
        self,
        circuits: Mapping[str, CircuitConfig],
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[str, UpstreamHealth], None] | None = None,
        capacity: CapacityProbe | None = None,
    ) -> None:
        self.clock = clock
        self.capacity = capacity
        """Read with every probe round, when the cluster's capacity route is enabled."""
        self.breakers = {name: Breaker(config, clock) for name, config in circuits.items()}
        self._on_change = on_change
        self._cluster_in_flight: dict[str, int] = {}
        self._reported: dict[str, CircuitState] = {}
        """The circuit state last passed to `on_change`, per upstream."""

    def snapshot(self) -> HealthSnapshot:
        now = self.clock()
        upstreams = {
            name: UpstreamHealth(b.state, b.deferred_until > now, b.probe_ok) for name, b in self.breakers.items()
        }
        return HealthSnapshot(
            upstreams, sum(self._cluster_in_flight.values()), dict(self._cluster_in_flight),
            self.capacity.models if self.capacity is not None else {},
        )

    def cluster_started(self, model: str) -> None:
        self._cluster_in_flight[model] = self._cluster_in_flight.get(model, 0) + 1

    def cluster_finished(self, model: str) -> None:
        self._cluster_in_flight[model] -= 1

    def acquire(self, name: str) -> bool:
        return self.breakers[name].acquire()

    def release(self, name: str) -> None:
        self.breakers[name].release()

    def success(self, name: str) -> None:
        breaker = self.breakers[name]
        breaker.success()
        if breaker.state is not self._reported.get(name):  # closed and staying closed: nothing to report
            self._changed(name)

    def failure(self, name: str) -> None:
        self.breakers[name].failure()
        self._changed(name)

    def defer(self, name: str, seconds: float) -> None:
        self.breakers[name].defer(seconds)

    def deferred_for(self, name: str) -> float:
        """Seconds until the upstream's Retry-After has passed (0 when it asked for none)."""
        return max(0.0, self.breakers[name].deferred_until - self.clock())

    def _changed(self, name: str) -> None:
        b = self.breakers[name]
        self._reported[name] = state = b.state
        if self._on_change is not None:
            self._on_change(name, UpstreamHealth(state, b.deferred_until > self.clock(), b.probe_ok))

    def publish(self) -> None:
        """Report every upstream's current state (time alone can move open -> half-open)."""
        for name in self.breakers:
            self._changed(name)

    async def probe_forever(self, upstreams: Mapping[str, Upstream], interval_s: float) -> None:
        """Probe each upstream every `interval_s` until cancelled."""
        while True:
            await self.probe_once(upstreams)
            await asyncio.sleep(interval_s)

    async def probe_once(self, upstreams: Mapping[str, Upstream]) -> None:
        names = list(upstreams)
        if self.capacity is not None:  # first: the cluster's probe leaves out models with no replica
            await self.capacity.refresh()
        results = await asyncio.gather(*(upstreams[n].probe() for n in names))
        for name, ok in zip(names, results, strict=True):
            self.breakers[name].probed(ok)
        self.publish()
