"""Self-hosted cost: running replica-hours x ``models.<m>.serve.cost_per_replica_hour``, counted in
``openweight_cluster_cost_usd_total{model}`` in the same unit (USD) as provider spend.

The replica count comes from a :class:`ReplicaSource`. Until capacity-aware routing reads the running
count from Serve's controller (a capacity route on the Serve port), :class:`ConfiguredReplicas` is
the source: the ``serve.replicas`` block, exact when the count is fixed (``min == max``) and its floor
(``min``) when Serve autoscales, so the cost is then a lower bound. Pass another source to
:func:`router.app.create_app` to replace it.

Every router replica counts the whole cluster (the cost does not depend on which router served):
dashboards aggregate it with ``max``, not ``sum``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

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
                log.info("cluster cost of %s counts its minimum of %d replica(s): Serve autoscales it up to %d "
                         "and the running count is not read yet", name, low, high)

    def running(self, model: str) -> float | None:
        return self._counts.get(model)


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
