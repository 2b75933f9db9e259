"""Prometheus metrics: one registry per app and one :class:`RequestObserver` per request.

Names carry the ``openweight_`` prefix (never the engine's ``vllm:`` names); durations are seconds.
Labels: `model` is the public name the client asked for (only configured names, so cardinality is
bounded), `upstream` is ``cluster`` or a provider's name (``none`` when nothing served).
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
            ["model", "upstream", "status"], registry=r,
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
            ["model", "upstream", "kind"], registry=r,
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

    def child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, cached: label lookup costs microseconds on the hot path."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def observe(self, model: str) -> RequestObserver:
        return RequestObserver(self, model)

    def refused(self, status: int) -> None:
        """A request the server answered itself, before it reached the app (400, 408, 431)."""
        self.child(self.requests, NONE, NONE, str(status)).inc()


class RequestObserver:
    """The metrics of one request; :meth:`finish` records it exactly once."""

    __slots__ = ("_finished", "_first_byte_at", "_m", "_overhead", "model", "start", "upstream")

    def __init__(self, metrics: Metrics, model: str) -> None:
        self._m = metrics
        self.model = model
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

    def usage(self, prompt: int, completion: int, upstream: str | None = None) -> None:
        """Tokens used at `upstream` (default: the one that answered)."""
        upstream = upstream or self.upstream
        if prompt > 0:
            self._m.child(self._m.tokens, self.model, upstream, "prompt").inc(prompt)
        if completion > 0:
            self._m.child(self._m.tokens, self.model, upstream, "completion").inc(completion)

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
        m.child(m.requests, self.model, self.upstream, str(status)).inc()
        m.child(m.duration, self.model, self.upstream).observe(time.perf_counter() - self.start)
        if self._first_byte_at is not None and status < 400:
            m.child(m.ttft, self.model, self.upstream).observe(self._first_byte_at - self.start)
        m.overhead.observe(self._overhead)
