"""Self-hosted cost: running replica-hours x ``models.<m>.serve.cost_per_replica_hour``, counted in
``openweight_cluster_cost_usd_total{model}`` in the same unit (USD) as provider spend.

The replica count comes from a :class:`ReplicaSource`. The router's source is
:class:`ServeReplicas`: the replicas that hold their devices (running and starting) as the cluster's
capacity route reports them from Serve's controller (:mod:`router.capacity`), read with every probe,
so a model scaled to zero costs nothing and an autoscaled one costs what runs. Where the route does
not answer (capacity disabled, an older or external Serve), :class:`ConfiguredReplicas` stands in:
the ``serve.replicas`` block, exact when the count is fixed (``min == max``) and its floor (``min``)
when Serve autoscales, so the cost is then a lower bound. Time between two reads is charged at the
count of the earlier one (:meth:`ClusterCost.accrue` runs before every read and at every scrape).

Every router replica counts the whole cluster (the cost does not depend on which router served):
dashboards aggregate it with ``max``, not ``sum``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from router.capacity import CapacityProbe
from router.metrics import Metrics
from router.settings import Settings

log = logging.getLogger("openweight.router")


class ReplicaSource(Protocol):
    """How many replicas of each self-hosted model hold their devices now."""

    def running(self, model: str) -> float | None:
        """Replicas of `model` (public name) running now; None when unknown."""
        ...


def _count(replicas: Any, key: str, default: int) -> int:
    value = replicas.get(key, default) if isinstance(replicas, Mapping) else default
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else default


class ConfiguredReplicas:
    """The replica count the config file asks Serve for (see the module docstring for its limits)."""

    def __init__(self, settings: Settings) -> None:
        self._counts: dict[str, int] = {}
        for name, model in settings.models.items():
            if model.serve is None:
                continue
            replicas = model.serve.get("replicas")
            low, high = _count(replicas, "min", 1), _count(replicas, "max", 1)
            self._counts[name] = low
            if low != high and model.serve.get("cost_per_replica_hour"):
                log.info("cluster cost of %s counts its minimum of %d replica(s) while the capacity route "
                         "does not answer: Serve autoscales it up to %d", name, low, high)

    def running(self, model: str) -> float | None:
        return self._counts.get(model)


class ServeReplicas:
    """Replicas holding their devices (running + starting) from the capacity route; `fallback` where
    it has no count for the model."""

    def __init__(self, probe: CapacityProbe, fallback: ReplicaSource) -> None:
        self._probe = probe
        self._fallback = fallback

    def running(self, model: str) -> float | None:
        capacity = self._probe.models.get(model)
        if capacity is None:
            return self._fallback.running(model)
        return capacity.running + capacity.starting


class ClusterCost:
    """Adds the cost of the time since the last call to the counter (called at every /metrics scrape)."""

    def __init__(self, settings: Settings, metrics: Metrics, source: ReplicaSource,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._metrics = metrics
        self._source = source
        self._clock = clock
        self._rates: dict[str, float] = {}
        """Model -> USD per replica-second."""
        if settings.cluster.enabled:
            for name, model in settings.models.items():
                hourly = (model.serve or {}).get("cost_per_replica_hour")
                if hourly:
                    self._rates[name] = float(hourly) / 3600.0
                    metrics.child(metrics.cluster_cost, name)  # exported (at 0) from the start
        self._since = clock()

    def accrue(self) -> None:
        now = self._clock()
        elapsed, self._since = now - self._since, now
        for model, rate in self._rates.items():
            replicas = self._source.running(model)
            if replicas:
                self._metrics.child(self._metrics.cluster_cost, model).inc(replicas * elapsed * rate)
