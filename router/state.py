"""Rate limits, budgets and spend counters: the interface every state store implements, and the
in-process one (the default: each router replica on its own).

Amounts are integers of nano-USD (1e-9 USD), so that adding them is exact in Python and in Redis
(``INCRBY``); a price of USD 0.01 per million tokens is 10 nano-USD per token.

One request meets the state twice, never inside the policy:

1. :meth:`StateStore.admit`, before the policy: the key's rate-limit token, the key's budget (refused
   past it) and the budgets of the providers the request may reach (reported as exhausted past them),
   each budget with a reservation of what the request may cost.
2. :meth:`StateStore.settle`, after the answer: what it really cost is added to the spend counters
   (per day and per month) and its reservations are released.

A budget admits a request while its period's spend plus the reservations of requests in flight is
below it, so concurrent requests overspend by at most what they reserved beyond the real cost.
:mod:`router.state_redis` shares all of it between router replicas.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from router.auth import Principal, RateLimiter
from router.errors import QuotaExceeded, RateLimited
from router.settings import RateLimit
from router.spend_config import Period

SCOPE_KEY = "key"
"""A budget or spend counter of a client key (by the key's name)."""
SCOPE_PROVIDER = "provider"
"""A budget or spend counter of a provider (by its name in the config)."""
SCOPES = (SCOPE_KEY, SCOPE_PROVIDER)

NANO_USD = 1_000_000_000
"""nano-USD per USD."""


def period_id(period: Period, now: float) -> str:
    """The UTC day (``2026-12-06``) or month (``2026-12``) that ``now`` (epoch seconds) falls in."""
    when = datetime.fromtimestamp(now, UTC)
    return when.strftime("%Y-%m-%d" if period is Period.DAY else "%Y-%m")


def period_left_s(period: Period, now: float) -> float:
    """Seconds from ``now`` until the period starts again."""
    when = datetime.fromtimestamp(now, UTC)
    start = when.replace(hour=0, minute=0, second=0, microsecond=0)
    if period is Period.DAY:
        end = start.timestamp() + 86400
    else:
        start = start.replace(day=1)
        end = (start.replace(year=start.year + 1, month=1) if start.month == 12
               else start.replace(month=start.month + 1)).timestamp()
    return end - now


@dataclass(frozen=True, slots=True)
class BudgetCheck:
    """One budget a request must be checked against, and what it reserves there."""

    scope: str
    name: str
    limit: int
    """nano-USD per period."""
    period: Period
    reserve: int
    """nano-USD held while the request runs (0: checked only)."""


@dataclass(frozen=True, slots=True)
class Ask:
    """What one request asks of the state before the policy."""

    key: str
    """The key's name (never the key)."""
    rate_limit: RateLimit | None
    budgets: tuple[BudgetCheck, ...]
    """The key's budget (refused past it) first, when it has one; then providers' (reported)."""


@dataclass(frozen=True, slots=True)
class Level:
    """Where one budget stood when a request was admitted (before its own reservation)."""

    scope: str
    name: str
    spent: int
    held: int
    limit: int

    @property
    def exhausted(self) -> bool:
        return self.spent + self.held >= self.limit


@dataclass(frozen=True, slots=True)
class Hold:
    """A reservation to release at settlement; ``where`` and ``slot`` are the store's own handle for it."""

    scope: str
    name: str
    amount: int
    where: str
    slot: int = 0


@dataclass(frozen=True, slots=True)
class Grant:
    """An admitted request: the budgets' levels and the reservations it holds."""

    levels: tuple[Level, ...]
    holds: tuple[Hold, ...]

    def exhausted(self, scope: str) -> frozenset[str]:
        """Names in `scope` whose budget was spent (spend plus reservations) when the request came."""
        return frozenset(level.name for level in self.levels if level.scope == scope and level.exhausted)


NO_GRANT = Grant((), ())


@dataclass(frozen=True, slots=True)
class Charge:
    """What a request cost, added to one spend counter (its day and its month)."""

    scope: str
    name: str
    amount: int


class StateError(Exception):
    """The state store failed or was too slow; the message never holds a secret (no URL)."""


class StateStore(Protocol):
    """Where rate limits, reservations and spend live. Methods raise :class:`StateError` when the
    store fails, :class:`RateLimited` or :class:`QuotaExceeded` when the request is refused."""

    shared: bool
    """Whether every router replica sees the same state."""

    async def admit(self, ask: Ask, now: float) -> Grant:
        """Check the key's budget, take its rate token, then check and reserve every budget of `ask`.

        Refused requests change nothing: past the key's budget no token is taken, and a rate-limited
        request reserves nothing. A provider past its budget is reported in the levels, not reserved.
        """
        ...

    async def settle(self, charges: Sequence[Charge], holds: Sequence[Hold], now: float) -> None:
        """Add `charges` to the spend of `now`'s day and month; release `holds`."""
        ...

    async def spent(self, scope: str, names: Sequence[str], period: Period, now: float) -> dict[str, int]:
        """Each name's spend in `now`'s period, nano-USD (reservations not included)."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


def rate_limited(key: str, limit: RateLimit, retry_after_s: float) -> RateLimited:
    return RateLimited(
        f"rate limit of {limit.requests_per_minute:g} requests/minute exceeded for key {key!r}",
        retry_after_s=retry_after_s,
    )


def quota_exceeded(key: str, check: BudgetCheck) -> QuotaExceeded:
    return QuotaExceeded(
        f"the API key {key!r} has spent its budget of USD {check.limit / NANO_USD:g} per {check.period.value}; "
        f"it starts again next {check.period.value} (UTC)"
    )


def bucket_capacity(limit: RateLimit) -> float:
    """Tokens a full bucket holds (``burst``, else the rate per minute, at least 1)."""
    return float(limit.burst or max(1, int(limit.requests_per_minute)))


class LocalState:
    """State in this process: exact for one router replica; with several, each counts on its own."""

    shared = False

    def __init__(self, limiter: RateLimiter | None = None) -> None:
        self.limiter = limiter or RateLimiter()
        """The token buckets (the same :class:`RateLimiter` the endpoints use before parsing)."""
        self._spent: dict[tuple[str, str, Period], tuple[str, int]] = {}
        """(scope, name, period) -> (period id, nano-USD); a new period replaces the old entry."""
        self._held: dict[tuple[str, str], int] = {}

    def take_token(self, key: str, limit: RateLimit | None) -> None:
        """One token of the key's bucket, or :class:`RateLimited` with the seconds until the next."""
        if limit is not None:
            self.limiter.check(Principal(key, rate_limit=limit))

    def _spent_now(self, scope: str, name: str, period: Period, now: float) -> int:
        found = self._spent.get((scope, name, period))
        return found[1] if found is not None and found[0] == period_id(period, now) else 0

    async def admit(self, ask: Ask, now: float) -> Grant:
        levels = tuple(
            Level(b.scope, b.name, self._spent_now(b.scope, b.name, b.period, now),
                  self._held.get((b.scope, b.name), 0), b.limit)
            for b in ask.budgets
        )
        for check, level in zip(ask.budgets, levels, strict=True):
            if check.scope == SCOPE_KEY and level.exhausted:
                raise quota_exceeded(ask.key, check)
        self.take_token(ask.key, ask.rate_limit)
        holds = []
        for check, level in zip(ask.budgets, levels, strict=True):
            if check.reserve > 0 and not level.exhausted:
                where = (check.scope, check.name)
                self._held[where] = self._held.get(where, 0) + check.reserve
                holds.append(Hold(check.scope, check.name, check.reserve, ""))
        return Grant(levels, tuple(holds))

    async def settle(self, charges: Sequence[Charge], holds: Sequence[Hold], now: float) -> None:
        for charge in charges:
            for period in Period:
                ident = period_id(period, now)
                slot = (charge.scope, charge.name, period)
                self._spent[slot] = (ident, self._spent_now(charge.scope, charge.name, period, now) + charge.amount)
        for hold in holds:
            where = (hold.scope, hold.name)
            left = self._held.get(where, 0) - hold.amount
            if left > 0:
                self._held[where] = left
            else:
                self._held.pop(where, None)

    async def spent(self, scope: str, names: Sequence[str], period: Period, now: float) -> dict[str, int]:
        return {name: self._spent_now(scope, name, period, now) for name in names}

    async def aclose(self) -> None:
        return None
