"""The HTTP endpoints. The inference handler reads as the pipeline:
auth -> parse -> policy -> dispatch -> relay, with metrics observed throughout."""

from __future__ import annotations

import asyncio
import time

from router import policy
from router.asgi import Request, until_disconnect
from router.auth import KeyStore, Principal, RateLimiter
from router.capacity import STATES, Waker
from router.cost import ClusterCost
from router.dispatch import Dispatcher
from router.errors import (
    ClientDisconnected,
    ClientError,
    ModelNotFound,
    OpenWeightError,
    ServiceShuttingDown,
    UnsupportedMediaType,
)
from router.health import Health
from router.metrics import NONE, Metrics, RequestObserver
from router.relay import error_event, relay
from router.replica_wait import wait_for_replica
from router.resume import Resumer, eligible
from router.schemas import Endpoint, ParsedRequest, parse_request
from router.settings import Settings
from router.spend import Spend, Ticket
from router.state import LocalState

CLIENT_CLOSED = 499
"""Status recorded in metrics when the client went away (nothing is sent)."""


class Endpoints:
    """Every route's handler, built once by :func:`router.app.create_app`."""

    def __init__(
        self,
        settings: Settings,
        keys: KeyStore,
        limiter: RateLimiter,
        health: Health,
        dispatcher: Dispatcher,
        metrics: Metrics,
        spend: Spend | None = None,
        cost: ClusterCost | None = None,
        waker: Waker | None = None,
    ) -> None:
        self.settings = settings
        self.keys = keys
        self.limiter = limiter
        self.health = health
        self.dispatcher = dispatcher
        self.metrics = metrics
        self.spend = spend or Spend(settings, metrics, LocalState(limiter))
        self.cost = cost
        self.waker = waker
        """Wakes models that requests arrive for while no replica runs (None: capacity not read)."""

    async def inference(self, request: Request, endpoint: Endpoint) -> None:
        observer: RequestObserver | None = None
        principal: Principal | None = None
        ticket: Ticket | None = None
        status = 500
        try:
            principal = self.keys.authenticate(request.header(b"authorization"))
            self.spend.check_rate(principal)
            content_type = request.header(b"content-type")
            if content_type is not None and content_type.split(";")[0].strip().lower() != "application/json":
                raise UnsupportedMediaType(f"content-type must be application/json, not {content_type!r}")
            parsed = parse_request(endpoint, await request.read_body(self.settings.router.max_body_bytes))
            if parsed.model not in self.settings.models:
                raise ModelNotFound(f"the model {parsed.model!r} does not exist", param="model")
            principal.check_model(parsed.model)
            observer = self.metrics.observe(parsed.model, principal.name)
            snapshot = self.health.snapshot()
            ticket = await self.spend.admit(principal, parsed, snapshot)  # state I/O: before the policy
            plan = policy.plan(self.settings, parsed.model, snapshot, ticket.exhausted)
            if plan.cold and self.waker is not None:
                self.waker.demand(parsed.model)
            observer.add_overhead(time.perf_counter() - request.start)
            status = await self._serve(request, parsed, plan, observer)
        except OpenWeightError as error:
            status = error.status
            if observer is None and isinstance(error, ClientError):
                observer = self.metrics.observe(NONE, principal.name if principal is not None else NONE)
            if not request.started_response and not isinstance(error, ClientDisconnected):
                await request.respond_error(error)
        finally:
            if observer is not None:
                observer.finish(status)
            if ticket is not None:  # settlement: after the answer
                upstream = observer.upstream if observer is not None else NONE
                served = upstream != NONE and (status < 300 or status == CLIENT_CLOSED)
                await self.spend.settle(ticket, upstream, observer.tokens if observer else {}, served=served,
                                        estimated=observer.estimated if observer else frozenset())

    async def _serve(
        self, request: Request, parsed: ParsedRequest, plan: policy.Plan, observer: RequestObserver
    ) -> int:
        """Dispatch and relay in this task; a watcher cancels it (and the upstream request) if the client leaves.

        One watcher task per request and no second task for the work itself: the request's own task
        does the work, which saves a task, a wait and their callbacks on every request.
        """
        task = asyncio.current_task()
        assert task is not None
        serving, gone = True, False

        async def watch() -> None:
            nonlocal gone
            await until_disconnect(request.receive)
            if serving:  # after the last byte uvicorn reports a disconnect too: not a departure then
                gone = True
                task.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            if plan.waits_for_replica:
                try:
                    await wait_for_replica(request, parsed.model, parsed.stream, self.health, self.settings,
                                           self.health.clock)
                    plan = policy.plan(self.settings, parsed.model, self.health.snapshot())
                    committed = await self.dispatcher.dispatch(parsed, plan, request.request_id, observer)
                except OpenWeightError as error:
                    if not request.started_response:
                        raise
                    # The stream started with waiting comments: it ends with the error in band.
                    await request.send({"type": "http.response.body", "body": error_event(error.message)})
                    return error.status
            else:
                committed = await self.dispatcher.dispatch(parsed, plan, request.request_id, observer)
            observer.upstream = committed.target.upstream
            resumer = None
            if self.settings.router.max_resumes and eligible(parsed):
                resumer = Resumer(self.settings, self.dispatcher, parsed, plan, request.request_id, observer)
            try:
                status = await relay(request, committed, observer, strip_usage=parsed.stream and not parsed.wants_usage,
                                     resumer=resumer)
                serving = False
                return status
            finally:
                committed.release()
                await committed.response.aclose()
        except asyncio.CancelledError:
            if gone:
                task.uncancel()
                return CLIENT_CLOSED
            # Cancelled by the server: its shutdown grace ran out. A started stream already ended
            # with an error event (relay); otherwise the client learns why in a 503.
            if request.started_response:
                status = committed.response.status
            else:
                await request.respond_error(ServiceShuttingDown())
                status = ServiceShuttingDown.status
            task.uncancel()
            return status
        finally:
            serving = False
            watcher.cancel()

    async def models(self, request: Request) -> None:
        principal = self.keys.authenticate(request.header(b"authorization"))
        created = 0
        data = [
            {"id": name, "object": "model", "created": created, "owned_by": "openweight"}
            for name in self.settings.models
            if principal.models is None or name in principal.models
        ]
        await request.respond_json(200, {"object": "list", "data": data})

    async def healthz(self, request: Request) -> None:
        await request.respond_json(200, {"status": "ok"})

    def upstreams_up(self) -> dict[str, int]:
        """Per model: how many of its upstreams (active, allowed by its policy) are not known dead."""
        snapshot = self.health.snapshot()
        return {
            model: sum(snapshot.upstreams[t.upstream].up for t in policy.candidates(self.settings, model, snapshot))
            for model in self.settings.models
        }

    async def readyz(self, request: Request) -> None:
        unserved = [model for model, up in self.upstreams_up().items() if not up]
        if unserved:
            await request.respond_json(503, {"status": "not ready", "models_without_upstream": unserved})
        else:
            await request.respond_json(200, {"status": "ready"})

    async def metrics_endpoint(self, request: Request) -> None:
        self.health.publish()
        await self.spend.refresh()
        if self.cost is not None:
            self.cost.accrue()
        for model, up in self.upstreams_up().items():
            self.metrics.child(self.metrics.model_upstreams_up, model).set(up)
        replicas = self.metrics.cluster_replicas
        replicas.clear()  # a model that left the capacity route (or the whole route) leaves no stale sample
        for model, capacity in self.health.snapshot().capacity.items():
            for state in STATES:
                replicas.labels(model, state).set(capacity.count(state))
        await request.respond(200, self.metrics.exposition(), content_type="text/plain; version=0.0.4")
