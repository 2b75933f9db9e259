"""Spend: prices, budgets and the reservation each request holds while it runs.

:meth:`Spend.admit` runs before the policy (one state round trip, none when nothing needs one) and
returns a :class:`Ticket`: the providers past their budget, which the policy skips (reason
``budget``), and the reservations taken. :meth:`Spend.settle` runs after the answer: the real cost
(``usage`` x the fallback entry's price) goes to the spend counters and to
``openweight_spend_usd_total``, and the reservations are released. A stream that broke before its
usage, or whose client left, is charged its reservation's estimate: a provider bills what it
generated, which the router cannot see then.

The reservation of a request is its estimate at the price of each upstream it will likely reach:
the model's upstreams in policy order up to the first that is healthy now (a self-hosted first model
with a healthy cluster reserves nothing against providers). The estimate is the prompt's size (a
token per :data:`BYTES_PER_TOKEN` bytes of the body) and ``max_tokens`` (or
``router.state.default_completion_tokens``), capped at ``router.state.max_reserved_tokens``.

With shared state (Redis) failing, a request is served (``on_error: open``: the key's rate limit
from this replica's own bucket, budgets not enforced) or refused with 503 (``closed``); each
failure counts in ``openweight_state_errors_total`` and is logged at most every few seconds.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from router.auth import Principal
from router.errors import StateUnavailable
from router.health import CircuitState, HealthSnapshot
from router.metrics import STATE_ADMIT, STATE_READ, STATE_SETTLE, Metrics
from router.policy import candidates
from router.schemas import Endpoint, ParsedRequest
from router.settings import Settings
from router.spend_config import Budget, OnStateError, Period, Price
from router.state import (
    NANO_USD,
    NO_GRANT,
    SCOPE_KEY,
    SCOPE_PROVIDER,
    Ask,
    BudgetCheck,
    Charge,
    Grant,
    LocalState,
    StateError,
    StateStore,
)

log = logging.getLogger("openweight.router")

BYTES_PER_TOKEN = 4
"""Bytes of request body counted as one prompt token in a reservation (English text averages ~4)."""
_LOG_EVERY_S = 10.0
_MAX_TOKENS = 10**12


MAX_CHARGE = 2**53
"""The most one request is ever charged, nano-USD (USD 9 million): an upstream's `usage` is not trusted
to stay within the integers Redis and Lua count exactly."""


def cost(price: Price, prompt: int, completion: int) -> int:
    """nano-USD for `prompt` and `completion` tokens at `price` (USD per million tokens); token counts
    below 0 count as 0, and the result is at most :data:`MAX_CHARGE`."""
    prompt, completion = (min(max(0, tokens), _MAX_TOKENS) for tokens in (prompt, completion))
    return min(MAX_CHARGE, round(prompt * price.input_per_mtok * 1000 + completion * price.output_per_mtok * 1000))


def prices(settings: Settings) -> dict[tuple[str, str], Price]:
    """(model, provider) -> the price of that fallback entry, for the entries that have one."""
    return {
        (model, fallback.provider): fallback.price
        for model, config in settings.models.items()
        for fallback in config.fallbacks
        if fallback.price is not None
    }


def estimate_tokens(parsed: ParsedRequest, default_completion: int, cap: int) -> tuple[int, int]:
    """(prompt, completion) tokens a request may use, for its reservation."""
    prompt = math.ceil(len(parsed.raw) / BYTES_PER_TOKEN)
    if parsed.endpoint is Endpoint.EMBEDDINGS:
        return prompt, 0
    asked = parsed.data.get("max_completion_tokens", parsed.data.get("max_tokens"))
    completion = asked if isinstance(asked, int) and not isinstance(asked, bool) and asked > 0 else default_completion
    return prompt, min(completion, cap)


def likely_upstreams(settings: Settings, model: str, snapshot: HealthSnapshot) -> list[str]:
    """The model's upstreams in policy order, up to and including the first one healthy now."""
    likely = []
    for target in candidates(settings, model, snapshot):
        likely.append(target.upstream)
        health = snapshot.upstreams.get(target.upstream)
        if health is not None and health.state is CircuitState.CLOSED and not health.deferred:
            break
    return likely


def to_nano(budget: Budget) -> int:
    return round(budget.usd * NANO_USD)


@dataclass(frozen=True, slots=True)
class Ticket:
    """An admitted request: what settlement needs."""

    key: str
    model: str
    estimate: tuple[int, int]
    grant: Grant
    store: StateStore | None
    """The store that granted it (None: nothing was asked of any)."""

    @property
    def exhausted(self) -> frozenset[str]:
        """Providers past their budget: the policy skips them."""
        return self.grant.exhausted(SCOPE_PROVIDER)


class Spend:
    """Budgets, reservations and spend of every request, over the local or the shared state."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        local: LocalState,
        shared: StateStore | None = None,
        key_budgets: Mapping[str, Budget] | None = None,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.local = local
        self.shared = shared
        self._state = settings.router.state
        self._wall = wall
        self._monotonic = monotonic
        self._prices = prices(settings)
        self._provider_budgets = {
            name: (to_nano(p.budget), p.budget) for name, p in settings.providers.items() if p.budget is not None
        }
        self._key_budgets = dict(key_budgets or {})
        self._skip_until = 0.0
        self._logged_at = -math.inf
        self._unlogged = 0

    def check_rate(self, principal: Principal) -> None:
        """Before parsing: the key's rate token, when this replica keeps its own (no shared state)."""
        if self.shared is None:
            self.local.limiter.check(principal)

    async def admit(self, principal: Principal, parsed: ParsedRequest, snapshot: HealthSnapshot) -> Ticket:
        """The state round trip before the policy; :class:`RateLimited`, :class:`QuotaExceeded` or
        :class:`StateUnavailable` when the request may not go on."""
        state = self._state
        estimate = estimate_tokens(parsed, state.default_completion_tokens, state.max_reserved_tokens)
        ask = self._ask(principal, parsed.model, snapshot, estimate)
        if ask is None:
            return Ticket(principal.name, parsed.model, estimate, NO_GRANT, None)
        if self.shared is None:
            grant = await self.local.admit(ask, self._wall())
            self._levels(grant)
            return Ticket(principal.name, parsed.model, estimate, grant, self.local)
        if self._monotonic() < self._skip_until:
            self._failed(STATE_ADMIT, None)
        else:
            try:
                grant = await self.shared.admit(ask, self._wall())
            except StateError as exc:
                self._failed(STATE_ADMIT, exc)
            else:
                self._levels(grant)
                return Ticket(principal.name, parsed.model, estimate, grant, self.shared)
        if state.on_error is OnStateError.CLOSED:
            raise StateUnavailable("rate limits and budgets cannot be checked now (shared state unavailable)")
        self.local.take_token(principal.name, principal.rate_limit)  # fail open: this replica's own bucket
        return Ticket(principal.name, parsed.model, estimate, NO_GRANT, None)

    def _ask(self, principal: Principal, model: str, snapshot: HealthSnapshot, estimate: tuple[int, int]) -> Ask | None:
        likely = likely_upstreams(self.settings, model, snapshot)
        costs = {name: cost(self._prices[(model, name)], *estimate) for name in likely if (model, name) in self._prices}
        budgets = []
        if principal.budget is not None:
            budgets.append(BudgetCheck(SCOPE_KEY, principal.name, to_nano(principal.budget), principal.budget.period,
                                       max(costs.values(), default=0)))
        seen = set()
        for fallback in self.settings.models[model].fallbacks:
            found = self._provider_budgets.get(fallback.provider)
            if found is not None and fallback.provider not in seen:
                seen.add(fallback.provider)
                limit, budget = found
                budgets.append(BudgetCheck(SCOPE_PROVIDER, fallback.provider, limit, budget.period,
                                           costs.get(fallback.provider, 0)))
        rate_limit = principal.rate_limit if self.shared is not None else None  # local: taken before parsing
        if rate_limit is None and not budgets:
            return None
        return Ask(principal.name, rate_limit, tuple(budgets))

    async def settle(self, ticket: Ticket, upstream: str, tokens: Mapping[str, tuple[int, int]], *,
                     served: bool, estimated: Collection[str] = ()) -> None:
        """After the answer: charge what it cost when it `served` (a 2xx answer, or one whose client
        left): the `tokens` each upstream reported (several when a stream was continued on another),
        or the reservation's estimate at `upstream` when none reported any, and at each upstream whose
        part broke before reporting (`estimated`); then release the reservations. Never raises."""
        parts = dict(tokens) if tokens else {upstream: ticket.estimate}
        for broken in estimated:
            parts[broken] = ticket.estimate
        charges: list[Charge] = []
        amount = 0
        for part_upstream, used in parts.items() if served else ():
            price = self._prices.get((ticket.model, part_upstream))
            part = cost(price, *used) if price is not None else 0
            if part > 0:
                self.metrics.child(self.metrics.spend, ticket.model, part_upstream, ticket.key).inc(part / NANO_USD)
                charges.append(Charge(SCOPE_PROVIDER, part_upstream, part))
                amount += part
        if not amount and not ticket.grant.holds:
            return
        if amount:
            charges.insert(0, Charge(SCOPE_KEY, ticket.key, amount))
        store = ticket.store or (self.shared if self.shared is not None else self.local)
        if store is self.shared and self._monotonic() < self._skip_until:
            self._failed(STATE_SETTLE, None)
            return
        try:
            await store.settle(charges, ticket.grant.holds, self._wall())
        except StateError as exc:
            self._failed(STATE_SETTLE, exc)

    async def refresh(self) -> None:
        """Update openweight_budget_used_ratio of every configured budget (for /metrics): one read per
        scope and period, however many keys there are."""
        store = self.shared if self.shared is not None else self.local
        if store is self.shared and self._monotonic() < self._skip_until:
            return
        groups: dict[tuple[str, Period], dict[str, int]] = {}
        for name, (limit, budget) in self._provider_budgets.items():
            groups.setdefault((SCOPE_PROVIDER, budget.period), {})[name] = limit
        for name, budget in self._key_budgets.items():
            groups.setdefault((SCOPE_KEY, budget.period), {})[name] = to_nano(budget)
        now = self._wall()
        try:
            for (scope, period), limits in groups.items():
                spent = await store.spent(scope, list(limits), period, now)
                for name, limit in limits.items():
                    self._ratio(scope, name, spent[name], limit)
        except StateError as exc:
            self._failed(STATE_READ, exc)

    def _levels(self, grant: Grant) -> None:
        for level in grant.levels:
            self._ratio(level.scope, level.name, level.spent, level.limit)

    def _ratio(self, scope: str, name: str, spent: int, limit: int) -> None:
        self.metrics.child(self.metrics.budget_used, scope, name).set(spent / limit)

    def _failed(self, operation: str, exc: StateError | None) -> None:
        """Count a failure; after a real one, skip the store for `retry_after_error_s`; log now and then."""
        self.metrics.child(self.metrics.state_errors, operation).inc()
        now = self._monotonic()
        if exc is not None:
            self._skip_until = now + self._state.retry_after_error_s
        self._unlogged += 1
        if now - self._logged_at >= _LOG_EVERY_S:
            what = f": {exc}" if exc is not None else " (skipped after a recent failure)"
            log.warning("shared state: %d operation(s) failed, latest %s%s; serving %s", self._unlogged, operation,
                        what, "without it" if self._state.on_error is OnStateError.OPEN else "nothing")
            self._logged_at, self._unlogged = now, 0

