"""The self-hosted cluster as one upstream, whichever data path it runs.

- ``classic``: every model is served at ``cluster.url`` (Ray Serve LLM's OpenAI ingress): one
  :class:`~router.upstreams.http.HttpUpstream`.
- ``direct``: each model has its own Serve application and base URL, derived from ``cluster.url``
  (:mod:`router.cluster_routes`). :class:`PerModelCluster` keeps one HTTP upstream per model id and
  sends each request to the one its target names; to the rest of the router it is still the one
  upstream ``cluster`` (one circuit, one set of metrics labels).

The prober leaves out a model whose capacity says no replica runs: Serve holds a request for such a
model's application until a replica has started and counts it as load, so a probe would start one.

A request for a model id the cluster does not host (none in a valid config: the policy only sends
configured models) fails as a client error would, without a connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from router.capacity import CapacityProbe
from router.cluster_routes import DataPath
from router.errors import UpstreamError, UpstreamSaturated
from router.settings import CLUSTER, ClusterConfig, Settings
from router.upstreams.base import UpstreamRequest
from router.upstreams.http import HttpResponse, HttpUpstream


class PerModelCluster:
    """One HTTP upstream per model id, each at that model's base URL; named ``cluster``."""

    def __init__(self, config: ClusterConfig, bases: dict[str, str]) -> None:
        self.name = CLUSTER
        self.config = config
        self.by_model = {
            model_id: HttpUpstream(CLUSTER, config.model_copy(update={"url": base}),
                                   request_timeout_s=config.request_timeout_s)
            for model_id, base in bases.items()
        }
        self.capacity: CapacityProbe | None = None
        """Replica counts per model (set by the app when the capacity route is read)."""

    @property
    def in_flight(self) -> int:
        return sum(up.in_flight for up in self.by_model.values())

    async def send(self, request: UpstreamRequest, timeout_s: float) -> HttpResponse:
        upstream = self.by_model.get(request.model)
        if upstream is None:
            raise UpstreamError(f"{CLUSTER}: no route for model {request.model!r}")
        limit = self.config.max_connections
        if limit is not None and self.in_flight >= limit:
            # cluster.max_connections bounds the cluster as a whole, not each model.
            raise UpstreamSaturated(f"{CLUSTER}: {limit} requests in flight, its max_connections")
        return await upstream.send(request, timeout_s)

    async def probe(self) -> bool:
        """Up while any model's application answers its model list (the circuit is the cluster's), or,
        when no model has a running replica, while the capacity route answers."""
        capacity = self.capacity
        probed = [up for model_id, up in self.by_model.items() if capacity is None or not capacity.idle(model_id)]
        if not probed:
            return bool(self.by_model) and capacity is not None and bool(capacity.answered)
        return any(await asyncio.gather(*(up.probe() for up in probed)))

    async def aclose(self) -> None:
        await asyncio.gather(*(up.aclose() for up in self.by_model.values()))


def cluster_model_ids(settings: Settings) -> Iterable[str]:
    """The model ids the router may send to the cluster."""
    return dict.fromkeys(settings.cluster_model_id(name) for name in settings.models)


def cluster_upstream(settings: Settings) -> HttpUpstream | PerModelCluster:
    """The cluster upstream for the configured data path."""
    config = settings.cluster
    if config.data_path is DataPath.CLASSIC:
        return HttpUpstream(CLUSTER, config, request_timeout_s=config.request_timeout_s)
    return PerModelCluster(config, {m: settings.cluster_base_url(m) for m in cluster_model_ids(settings)})
