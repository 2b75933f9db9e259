"""Wiring: :func:`create_app` builds every component from the settings and returns the ASGI app.

The app is plain ASGI (no framework) so streams pass through untouched. The edge gives every
request an id, routes it, and renders any error as OpenAI-format JSON; an unexpected exception
becomes a logged 500 with no detail.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping

from router.asgi import Receive, Request, Scope, Send
from router.auth import KeyStore, RateLimiter
from router.capacity import CapacityProbe, Waker
from router.cost import ClusterCost, ConfiguredReplicas, ReplicaSource, ServeReplicas
from router.dispatch import Dispatcher
from router.endpoints import Endpoints
from router.errors import MethodNotAllowed, NotFound, OpenWeightError, ServiceShuttingDown
from router.health import Health, UpstreamHealth
from router.metrics import Metrics
from router.schemas import Endpoint
from router.settings import CLUSTER, Settings, UpstreamConfig
from router.spend import Spend
from router.state import LocalState, StateStore
from router.upstreams.base import Upstream
from router.upstreams.cluster import PerModelCluster, cluster_upstream
from router.upstreams.http import provider_upstream

log = logging.getLogger("openweight.router")

Handler = Callable[[Request], Awaitable[None]]

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def build_upstreams(settings: Settings) -> dict[str, Upstream]:
    """The cluster (when enabled) and every active provider."""
    upstreams: dict[str, Upstream] = {}
    if settings.cluster.enabled:
        upstreams[CLUSTER] = cluster_upstream(settings)
    for name, provider in settings.providers.items():
        if provider.active:
            upstreams[name] = provider_upstream(name, provider)
    return upstreams


class RouterApp:
    """The ASGI application: routes, lifespan (prober, connection pools) and error rendering."""

    def __init__(self, settings: Settings, endpoints: Endpoints, upstreams: Mapping[str, Upstream],
                 state: StateStore | None = None) -> None:
        self.settings = settings
        self.endpoints = endpoints
        self.upstreams = upstreams
        self.state = state
        """The shared state store, closed at shutdown (None: in-process state)."""
        e = endpoints
        self.routes: dict[str, dict[str, Handler]] = {
            "/v1/chat/completions": {"POST": lambda r: e.inference(r, Endpoint.CHAT)},
            "/v1/completions": {"POST": lambda r: e.inference(r, Endpoint.COMPLETIONS)},
            "/v1/embeddings": {"POST": lambda r: e.inference(r, Endpoint.EMBEDDINGS)},
            "/v1/models": {"GET": e.models},
            "/healthz": {"GET": e.healthz},
            "/readyz": {"GET": e.readyz},
            "/metrics": {"GET": e.metrics_endpoint},
        }
        self._prober: asyncio.Task[None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive, send, _request_id(scope))
        try:
            methods = self.routes.get(scope["path"].rstrip("/") or "/")
            if methods is None:
                raise NotFound(f"no route {scope['path']!r}; see /v1/models")
            handler = methods.get(scope["method"])
            if handler is None:
                allowed = ", ".join(methods)
                raise MethodNotAllowed(
                    f"method {scope['method']} is not allowed here (allowed: {allowed})",
                    headers={"allow": allowed},
                )
            await handler(request)
        except OpenWeightError as error:
            if not request.started_response:
                await request.respond_error(error)
        except asyncio.CancelledError:
            if request.started_response:
                raise
            # The server's shutdown grace ran out before this request was answered (its body was
            # still arriving, say). One being served answers for itself (Endpoints._serve).
            await request.respond_error(ServiceShuttingDown())
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
        except Exception:
            log.exception("request %s: unexpected error", request.request_id)
            if not request.started_response:
                await request.respond_error(OpenWeightError("internal error in the router"))

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.startup()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def startup(self) -> None:
        """Probe once before serving (so readiness is known), then keep probing."""
        probed = {
            name: up for name, up in self.upstreams.items() if upstream_config(self.settings, name).probe
        }
        health = self.endpoints.health
        health.publish()
        if probed or health.capacity is not None:  # the capacity route is read by the same prober
            await health.probe_once(probed)
            self._prober = asyncio.create_task(
                health.probe_forever(probed, self.settings.router.probe_interval_s)
            )

    async def shutdown(self) -> None:
        if self._prober is not None:
            self._prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._prober
        if self.endpoints.waker is not None:
            await self.endpoints.waker.aclose()
        if self.endpoints.health.capacity is not None:
            await self.endpoints.health.capacity.aclose()
        await asyncio.gather(*(up.aclose() for up in self.upstreams.values()))
        if self.state is not None:
            await self.state.aclose()


def _request_id(scope: Scope) -> str:
    for key, value in scope["headers"]:
        if key == b"x-request-id":
            candidate = value.decode("latin-1")
            if _REQUEST_ID.fullmatch(candidate):
                return str(candidate)
            break
    return secrets.token_hex(16)


def create_app(
    settings: Settings,
    *,
    keys: KeyStore | None = None,
    metrics: Metrics | None = None,
    upstreams: Mapping[str, Upstream] | None = None,
    clock: Callable[[], float] | None = None,
    state: StateStore | None = None,
    replicas: ReplicaSource | None = None,
) -> RouterApp:
    """Build the router. Every dependency can be passed in; defaults come from `settings`
    (`state`: the shared state store, Redis when ``router.state.redis_url`` is set)."""
    metrics = metrics or Metrics()
    upstreams = dict(upstreams) if upstreams is not None else build_upstreams(settings)

    def on_change(name: str, health: UpstreamHealth) -> None:
        metrics.circuit.labels(name).set(int(health.state))
        metrics.up.labels(name).set(1 if health.up else 0)

    clock = clock or time.monotonic
    capacity = CapacityProbe(settings) if CLUSTER in upstreams and settings.cluster.capacity.enabled else None
    if capacity is not None and isinstance(cluster := upstreams[CLUSTER], PerModelCluster):
        cluster.capacity = capacity
    health = Health(
        {name: upstream_config(settings, name).circuit for name in upstreams}, clock, on_change, capacity
    )
    dispatcher = Dispatcher(upstreams, health, settings.router.retry, settings.router.deadline_s, clock)
    keys = keys if keys is not None else KeyStore.from_config(settings.router.auth)
    limiter = RateLimiter()
    if state is None and settings.router.state.redis_url is not None:
        from router.state_redis import RedisState  # only a router with shared state needs redis-py

        state = RedisState(settings.router.state)
    key_budgets = {p.name: p.budget for p in keys.principals if p.budget is not None}
    spend = Spend(settings, metrics, LocalState(limiter), state, key_budgets)
    if replicas is None:
        configured = ConfiguredReplicas(settings)
        replicas = ServeReplicas(capacity, configured) if capacity is not None else configured
    cost = ClusterCost(settings, metrics, replicas)
    if capacity is not None:
        capacity.before_refresh = cost.accrue  # the time since the last count is charged at that count
    waker = Waker(capacity, settings, clock) if capacity is not None else None
    endpoints = Endpoints(settings, keys, limiter, health, dispatcher, metrics, spend, cost, waker)
    return RouterApp(settings, endpoints, upstreams, state)


def upstream_config(settings: Settings, name: str) -> UpstreamConfig:
    """The configuration of the upstream called `name`."""
    return settings.cluster if name == CLUSTER else settings.providers[name]
