"""Prometheus metrics: one registry per app and one :class:`RequestObserver` per request.

Names carry the ``openweight_`` prefix (never the engine's ``vllm:`` names); durations are seconds.
Labels: `model` is the public name the client asked for (only configured names, so cardinality is
bounded), `upstream` is ``cluster`` or a provider's name (``none`` when nothing served), `key` is the
client key's name (never the key; names are bounded by the keys file; ``anonymous`` when the router
runs open, ``none`` before a key was checked).
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from router.outcomes import Outcome

NONE = "none"
RESUME_SUCCESS = "success"
"""`outcome` of openweight_stream_resumes_total: the continuation started."""
RESUME_FAILED = "failed"
"""`outcome` of openweight_stream_resumes_total: no upstream took the continuation (error event)."""

MAX_TOKENS = 10**12
"""The most tokens one `usage` counts: an upstream's JSON may carry integers no float holds."""

STATE_ADMIT = "admit"
"""`operation` of openweight_state_errors_total: the check and reservation before the policy."""
STATE_SETTLE = "settle"
"""`operation` of openweight_state_errors_total: adding the spend and releasing reservations."""
STATE_READ = "read"
"""`operation` of openweight_state_errors_total: reading budgets' spend (for /metrics)."""

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
_OVERHEAD_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1)


class Metrics:
    """Every metric the router exports, registered in its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        r = self.registry
        self.requests = Counter(
            "openweight_requests", "Finished requests by final HTTP status.",
            ["model", "upstream", "status", "key"], registry=r,
        )
        self.duration = Histogram(
            "openweight_request_duration_seconds", "Time from request arrival to the last byte sent.",
            ["model", "upstream"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.ttft = Histogram(
            "openweight_time_to_first_token_seconds",
            "Time from request arrival to the first body byte sent to the client.",
            ["model", "upstream"], buckets=_TTFT_BUCKETS, registry=r,
        )
        self.fallbacks = Counter(
            "openweight_fallbacks", "Moves from one upstream to the next, by reason.",
            ["model", "from_upstream", "to_upstream", "reason"], registry=r,
        )
        self.attempts = Counter(
            "openweight_upstream_attempts", "Attempts at an upstream by outcome.",
            ["upstream", "outcome"], registry=r,
        )
        self.up = Gauge(
            "openweight_upstream_up", "1 when the upstream is not known dead (probe and circuit).",
            ["upstream"], registry=r,
        )
        self.model_upstreams_up = Gauge(
            "openweight_model_upstreams_up",
            "Upstreams of a model (active, allowed by its policy) not known dead; 0 means it cannot be served.",
            ["model"], registry=r,
        )
        self.cluster_replicas = Gauge(
            "openweight_cluster_replicas",
            "Replicas of a model on the cluster by state (running, starting, target), from the capacity route; "
            "absent while the cluster does not answer it.",
            ["model", "state"], registry=r,
        )
        self.circuit = Gauge(
            "openweight_circuit_state", "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
            ["upstream"], registry=r,
        )
        self.tokens = Counter(
            "openweight_tokens", "Tokens reported in upstream `usage`, by kind (prompt, completion).",
            ["model", "upstream", "kind", "key"], registry=r,
        )
        self.in_flight = Gauge(
            "openweight_in_flight_requests", "Requests being served now.", ["model"], registry=r,
        )
        self.stream_errors = Counter(
            "openweight_stream_errors", "Streams that broke after bytes reached the client.",
            ["model", "upstream"], registry=r,
        )
        self.stream_resumes = Counter(
            "openweight_stream_resumes",
            "Broken streams continued on another upstream (or the same again), by outcome.",
            ["model", "from_upstream", "to_upstream", "outcome"], registry=r,
        )
        self.resume_gap = Histogram(
            "openweight_stream_resume_gap_seconds",
            "The pause a client saw in a continued stream: from the break to the continuation's first byte.",
            ["model"], buckets=_TTFT_BUCKETS, registry=r,
        )
        self.overhead = Histogram(
            "openweight_router_overhead_seconds",
            "Time spent in the router itself before the first upstream attempt (edge, auth, parsing, "
            "policy) and after the upstream answered a non-streamed request.",
            buckets=_OVERHEAD_BUCKETS, registry=r,
        )
        self.spend = Counter(
            "openweight_spend_usd", "Provider spend in USD: `usage` x the fallback entry's price (an estimate "
            "from the reservation when a stream broke before its usage).",
            ["model", "upstream", "key"], registry=r,
        )
        self.cluster_cost = Counter(
            "openweight_cluster_cost_usd", "Self-hosted cost in USD: running replica-hours x "
            "serve.cost_per_replica_hour. Every router replica counts the whole cluster: aggregate with max.",
            ["model"], registry=r,
        )
        self.state_errors = Counter(
            "openweight_state_errors", "Shared-state (Redis) operations that failed or timed out.",
            ["operation"], registry=r,
        )
        for operation in (STATE_ADMIT, STATE_SETTLE, STATE_READ):
            self.child(self.state_errors, operation)  # exported at 0, so that rate() sees the first error
        self.budget_used = Gauge(
            "openweight_budget_used_ratio", "Spend of the current period over the budget (1 = spent), as this "
            "router last read it; scope is key or provider, owner the key's or provider's name.",
            ["scope", "owner"], registry=r,
        )

    def child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, cached: label lookup costs microseconds on the hot path."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def observe(self, model: str, key: str = NONE) -> RequestObserver:
        return RequestObserver(self, model, key)

    def refused(self, status: int) -> None:
        """A request the server answered itself, before it reached the app (400, 408, 431)."""
        self.child(self.requests, NONE, NONE, str(status), NONE).inc()


class RequestObserver:
    """The metrics of one request; :meth:`finish` records it exactly once."""

    __slots__ = ("_finished", "_first_byte_at", "_m", "_overhead", "estimated", "key", "model", "start", "tokens",
                 "upstream")

    def __init__(self, metrics: Metrics, model: str, key: str = NONE) -> None:
        self._m = metrics
        self.model = model
        self.key = key
        self.tokens: dict[str, tuple[int, int]] = {}
        """(prompt, completion) per upstream that reported `usage` (several when a stream was continued)."""
        self.estimated: set[str] = set()
        """Upstreams whose part broke before reporting usage: their `tokens` are a lower bound."""
        self.start = time.perf_counter()
        self.upstream = NONE
        self._first_byte_at: float | None = None
        self._overhead = 0.0
        self._finished = False
        metrics.child(metrics.in_flight, model).inc()

    def attempt(self, upstream: str, outcome: Outcome) -> None:
        self._m.child(self._m.attempts, upstream, outcome).inc()

    def fallback(self, from_upstream: str, to_upstream: str, reason: Outcome) -> None:
        self._m.child(self._m.fallbacks, self.model, from_upstream, to_upstream, reason).inc()

    def add_overhead(self, seconds: float) -> None:
        self._overhead += seconds

    def first_byte(self) -> None:
        if self._first_byte_at is None:
            self._first_byte_at = time.perf_counter()

    def usage(self, prompt: int, completion: int, upstream: str | None = None, *, estimated: bool = False) -> None:
        """Tokens used at `upstream` (default: the one that answered), from its `usage`; counts out of
        range (negative, or past any real answer) are clamped. A continued stream reports each part;
        `estimated`: the part broke before its upstream reported usage (spend charges it the estimate)."""
        upstream = upstream or self.upstream
        if estimated:
            self.estimated.add(upstream)
        prompt, completion = min(max(0, prompt), MAX_TOKENS), min(max(0, completion), MAX_TOKENS)
        before = self.tokens.get(upstream, (0, 0))
        self.tokens[upstream] = (min(before[0] + prompt, MAX_TOKENS), min(before[1] + completion, MAX_TOKENS))
        if prompt > 0:
            self._m.child(self._m.tokens, self.model, upstream, "prompt", self.key).inc(prompt)
        if completion > 0:
            self._m.child(self._m.tokens, self.model, upstream, "completion", self.key).inc(completion)

    def stream_error(self) -> None:
        self._m.child(self._m.stream_errors, self.model, self.upstream).inc()

    def stream_resume(self, from_upstream: str, to_upstream: str, outcome: str) -> None:
        self._m.child(self._m.stream_resumes, self.model, from_upstream, to_upstream, outcome).inc()

    def resume_gap(self, seconds: float) -> None:
        self._m.child(self._m.resume_gap, self.model).observe(seconds)

    def finish(self, status: int) -> None:
        if self._finished:
            return
        self._finished = True
        m = self._m
        m.child(m.in_flight, self.model).dec()
        m.child(m.requests, self.model, self.upstream, str(status), self.key).inc()
        m.child(m.duration, self.model, self.upstream).observe(time.perf_counter() - self.start)
        if self._first_byte_at is not None and status < 400:
            m.child(m.ttft, self.model, self.upstream).observe(self._first_byte_at - self.start)
        m.overhead.observe(self._overhead)
