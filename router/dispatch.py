"""Dispatch: try a plan's targets in order until one answers.

An answer is *committed* once its status, headers and first body chunk arrived and the status is
not a fallback trigger; nothing has reached the client before that, so falling back is always safe
here and never after. Only the last target is retried (tenacity: exponential backoff with jitter,
Retry-After honoured, all within the request's deadline): while another target remains, moving on is
faster than backing off.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC
from email.utils import parsedate_to_datetime

from tenacity import RetryCallState, Retrying
from tenacity.wait import wait_exponential_jitter

from router.errors import UpstreamError, UpstreamSaturated, UpstreamUnavailable
from router.health import Health
from router.metrics import NONE, RequestObserver
from router.outcomes import Outcome
from router.policy import Plan, Skip, Target
from router.schemas import ParsedRequest
from router.settings import CLUSTER, RetryConfig
from router.upstreams.base import Upstream, UpstreamRequest, UpstreamResponse

_COMMITS = (Outcome.SUCCESS, Outcome.CLIENT_ERROR)
"""The outcomes whose answer goes to the client; every other one is a failure."""


def outcome_of(status: int) -> Outcome:
    """The attempt outcome of an upstream HTTP status; only `success`/`client_error` commit."""
    if status < 200:
        return Outcome.PROTOCOL_ERROR  # 101 Switching Protocols (or another 1xx as the final answer): not HTTP we relay
    if status < 300:
        return Outcome.SUCCESS
    if status < 400:
        return Outcome.SERVER_ERROR  # an OpenAI-compatible API never redirects: a wrong URL, or not the API
    if status in (401, 403):
        return Outcome.AUTH_ERROR  # our credentials at that upstream, not the client's mistake
    if status == 408:
        return Outcome.TIMEOUT
    if status in (429, 503):
        return Outcome.OVERLOADED
    if status >= 500:
        return Outcome.SERVER_ERROR
    return Outcome.CLIENT_ERROR


_NEVER_S = 366 * 86400.0
"""A Retry-After this far off (or not finite) is not a usable hint and is ignored."""


def retry_after_s(headers: Mapping[str, str], now: Callable[[], float] = time.time) -> float | None:
    """Seconds from a Retry-After header: delta-seconds, or an HTTP date (RFC 9110) counted from `now`."""
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:  # RFC 9110 dates are GMT
            when = when.replace(tzinfo=UTC)
        return min(max(0.0, when.timestamp() - now()), _NEVER_S)
    return seconds if 0 <= seconds < _NEVER_S else None  # also refuses nan and inf


class _Failed(Exception):
    """One attempt failed with `outcome`; another upstream may do better."""

    def __init__(self, outcome: Outcome, detail: str, retry_after: float | None = None, attempts: int = 1) -> None:
        super().__init__(detail)
        self.outcome = outcome
        self.detail = detail
        self.retry_after = retry_after
        self.attempts = attempts
        """Requests sent to the upstream before this failure, by every try (0: none left the router)."""


@dataclass(slots=True)
class Committed:
    """The answer the client gets; call :meth:`release` once it has been relayed."""

    target: Target
    response: UpstreamResponse
    attempts: int
    _release: Callable[[], None] | None = field(default=None, repr=False)

    def release(self) -> None:
        if self._release is not None:
            self._release()
            self._release = None


class Dispatcher:
    """Runs plans against upstreams, reporting every outcome to health and metrics."""

    def __init__(
        self,
        upstreams: Mapping[str, Upstream],
        health: Health,
        retry: RetryConfig,
        deadline_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._upstreams = upstreams
        self._health = health
        self._retry = retry
        self._deadline_s = deadline_s
        self._clock = clock
        # Tenacity's exponential backoff with jitter, asked for one pause at a time (_pause_s): running
        # a tenacity loop costs more than a whole request, and most requests need no retry.
        self._backoff = Retrying(
            wait=wait_exponential_jitter(multiplier=retry.backoff_initial_s, max=retry.backoff_max_s)
        )

    async def dispatch(
        self, request: ParsedRequest, plan: Plan, request_id: str, observer: RequestObserver
    ) -> Committed:
        """The first committed answer of the plan, or :class:`UpstreamUnavailable`."""
        deadline = self._clock() + self._deadline_s
        targets = plan.targets
        pending: list[tuple[str, Outcome]] = []  # (from_upstream, reason) waiting for their `to`
        failures: list[str] = []
        retry_hint: float | None = None
        attempts = 0
        for step in plan.steps:
            if isinstance(step, Skip):
                pending.append((step.target.upstream, step.reason))
                failures.append(f"{step.target.upstream}: {step.reason.replace('_', ' ')}")
                if step.reason is Outcome.CIRCUIT_OPEN:
                    # When that circuit lets a trial through is when asking again makes sense.
                    reopens = self._health.breakers[step.target.upstream].reopens_in_s()
                    retry_hint = reopens if retry_hint is None else min(retry_hint, reopens)
                continue
            if self._clock() >= deadline:
                failures.append(f"{step.upstream}: deadline reached before trying")
                pending.append((step.upstream, Outcome.DEADLINE))
                break
            for from_upstream, reason in pending:
                observer.fallback(from_upstream, step.upstream, reason)
            pending.clear()
            last = step is targets[-1]
            upstream_request = UpstreamRequest(
                "POST", request.endpoint.value, request.body_for(step.model_id), request_id, stream=request.stream,
                model=step.model_id,
            )
            tries = self._retry.max_attempts if last else 1
            try:
                response, used = await self._with_retries(step, upstream_request, observer, deadline, tries)
            except _Failed as failed:
                attempts += failed.attempts
                pending.append((step.upstream, failed.outcome))
                failures.append(f"{step.upstream}: {failed.detail}")
                if failed.retry_after is not None:
                    retry_hint = failed.retry_after if retry_hint is None else min(retry_hint, failed.retry_after)
                continue
            attempts += used
            return Committed(step, response, attempts, self._in_flight(request.model, step))
        for from_upstream, reason in pending:
            observer.fallback(from_upstream, NONE, reason)
        headers = {"x-openweight-upstream": NONE, "x-openweight-attempts": str(attempts)}
        if retry_hint is not None:
            headers["retry-after"] = str(max(1, math.ceil(retry_hint)))
        reasons = "; ".join(failures) or "no upstream is configured and active"
        raise UpstreamUnavailable(f"no upstream could serve model {request.model!r} ({reasons})", headers=headers)

    def _in_flight(self, model: str, target: Target) -> Callable[[], None] | None:
        if target.upstream != CLUSTER:
            return None
        self._health.cluster_started(model)
        return lambda: self._health.cluster_finished(model)

    async def _with_retries(
        self, target: Target, request: UpstreamRequest, observer: RequestObserver, deadline: float, tries: int
    ) -> tuple[UpstreamResponse, int]:
        """Try `target` up to `tries` times: its response and the requests sent, or the last failure.

        A failure is tried again unless it cannot get better (:meth:`_retryable`), after a pause
        (:meth:`_pause_s`) only when that pause ends before the deadline.
        """
        tried = sent = 0
        while True:
            tried += 1
            try:
                return await self._attempt(target, request, observer, deadline), sent + 1
            except _Failed as failed:
                sent += failed.attempts
                failed.attempts = sent
                if tried >= tries or not self._retryable(failed):
                    raise
                pause = self._pause_s(tried, failed)
                if self._clock() + pause >= deadline:
                    raise
            await asyncio.sleep(pause)

    def _retryable(self, failed: _Failed) -> bool:
        """Not when our credentials were refused, nor when the upstream asks for longer than we wait."""
        if failed.outcome is Outcome.AUTH_ERROR:
            return False
        return (failed.retry_after or 0.0) <= self._retry.max_retry_after_s

    def _pause_s(self, tried: int, failed: _Failed) -> float:
        """The pause after `tried` tries, the last of which ended in `failed`: tenacity's exponential
        backoff with jitter, or the upstream's Retry-After when that is longer."""
        state = RetryCallState(self._backoff, fn=None, args=(), kwargs={})
        state.attempt_number = tried
        return max(self._backoff.wait(state), failed.retry_after or 0.0)

    async def _attempt(
        self, target: Target, request: UpstreamRequest, observer: RequestObserver, deadline: float
    ) -> UpstreamResponse:
        name = target.upstream
        wait = self._health.deferred_for(name)
        if wait > 0:
            # It asked for time (Retry-After) and is the last one left: wait for it, or not at all.
            if wait > self._retry.max_retry_after_s or self._clock() + wait >= deadline:
                raise _Failed(Outcome.OVERLOADED, f"overloaded (Retry-After {math.ceil(wait)} s)", wait, attempts=0)
            await asyncio.sleep(wait)
        if not self._health.acquire(name):
            observer.attempt(name, Outcome.CIRCUIT_OPEN)
            raise _Failed(Outcome.CIRCUIT_OPEN, "circuit open")
        try:
            response = await self._upstreams[name].send(request, max(0.001, deadline - self._clock()))
        except UpstreamSaturated as exc:
            self._health.release(name)  # our own limit, not the upstream failing: its circuit is untouched
            observer.attempt(name, exc.outcome)
            raise _Failed(exc.outcome, "saturated (its max_connections requests are in flight)", attempts=0) from None
        except UpstreamError as exc:
            self._health.failure(name)
            observer.attempt(name, exc.outcome)
            raise _Failed(exc.outcome, exc.outcome.replace("_", " ")) from None
        except BaseException:
            self._health.release(name)
            raise
        outcome = outcome_of(response.status)
        if response.status == 404 and "json" not in response.headers.get("content-type", ""):
            # A plain 404 is the upstream not serving the API at all (e.g. Ray Serve's proxy while
            # the app is deployed nowhere), not an OpenAI "model not found" for the client.
            outcome = Outcome.SERVER_ERROR
        observer.attempt(name, outcome)
        if outcome in _COMMITS:
            self._health.success(name)
            return response
        await response.aclose()
        hint = retry_after_s(response.headers)
        if outcome is Outcome.OVERLOADED and (hint is not None or response.status == 429):
            # Back-pressure, not a dead upstream: keep the circuit closed, send nothing until then.
            self._health.release(name)
            self._health.defer(name, hint if hint is not None else 1.0)
        else:
            self._health.failure(name)
        raise _Failed(outcome, f"{outcome.replace('_', ' ')} ({response.status})", hint)
