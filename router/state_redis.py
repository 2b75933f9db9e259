"""Shared state in Redis (``router.state.redis_url``): every router replica sees the same rate limits,
budgets, reservations and spend.

Each request costs at most two round trips: one Lua script before the policy (:data:`_ADMIT`: check
the key's budget, take its rate token, check and reserve every budget) and one after the answer
(:data:`_SETTLE`). Scripts run atomically, so two routers can never both take a key's last token or
both reserve a budget's last dollar. Time is Redis's own (``TIME``), the same for every router.

Keys (all under one hash tag, ``{prefix}``, so a script's keys share a cluster slot):

- ``{p}:rate:<key>``: the key's token bucket (``tokens``, ``at``), expiring once it would be full.
- ``{p}:spent:<scope>:<name>:<period id>``: nano-USD spent in that day or month, expiring after it.
- ``{p}:held:<scope>:<name>:<slot>``: reservations made in one slot of time (a minute,
  :data:`SLOT_S`, or ``reservation_ttl_s`` when shorter); a budget counts the slots of the last
  ``reservation_ttl_s``, and each slot expires after them, so a router that dies mid-request leaks
  its reservations for that long (plus a slot) at most.

Names are percent-encoded in keys. redis-py errors and timeouts become :class:`StateError` here and
nowhere else; the URL (it may hold a password) never appears in one.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from router.settings import Period, StateConfig
from router.state import (
    SCOPE_KEY,
    Ask,
    Charge,
    Grant,
    Hold,
    Level,
    StateError,
    bucket_capacity,
    period_id,
    quota_exceeded,
    rate_limited,
)

SLOT_S = 60
"""Seconds of one reservation slot (at most)."""
_SPENT_TTL_S = {Period.DAY: 3 * 86400, Period.MONTH: 63 * 86400}

_ADMIT = """
-- KEYS[1]: rate bucket (or a dummy when ARGV[1] == 0); then per budget: its spent key, then its
-- ARGV[3] slot keys, the newest (this minute) last.
-- ARGV: rate per second, capacity, slots per budget, slot ttl ms, then per budget: limit, reserve,
-- refuse (1: the key's own budget, refused past it).
-- Returns {0, spent1, held1, ...} admitted; {1, wait ms} rate limited; {2, index} past the key's budget.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate, capacity, slots, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local n = (#ARGV - 4) / 3
local levels = {0}
for i = 1, n do
  local base = 1 + (i - 1) * (slots + 1)
  local spent = tonumber(redis.call('GET', KEYS[base + 1]) or '0')
  local held = 0
  for _, v in ipairs(redis.call('MGET', unpack(KEYS, base + 2, base + 1 + slots))) do
    if v then held = held + tonumber(v) end
  end
  if ARGV[4 + (i - 1) * 3 + 3] == '1' and spent + held >= tonumber(ARGV[4 + (i - 1) * 3 + 1]) then
    return {2, i}
  end
  levels[#levels + 1] = spent
  levels[#levels + 1] = held
end
if rate > 0 then
  local bucket = redis.call('HMGET', KEYS[1], 'tokens', 'at')
  local tokens, at = tonumber(bucket[1]) or capacity, tonumber(bucket[2]) or now
  tokens = math.min(capacity, tokens + math.max(0, now - at) * rate)
  if tokens < 1 then
    return {1, math.ceil((1 - tokens) / rate * 1000)}
  end
  redis.call('HSET', KEYS[1], 'tokens', tostring(tokens - 1), 'at', tostring(now))
  redis.call('PEXPIRE', KEYS[1], math.ceil(capacity / rate * 1000) + 1000)
end
for i = 1, n do
  local reserve = tonumber(ARGV[4 + (i - 1) * 3 + 2])
  local limit = tonumber(ARGV[4 + (i - 1) * 3 + 1])
  if reserve > 0 and levels[2 * i] + levels[2 * i + 1] < limit then
    local slot = KEYS[1 + (i - 1) * (slots + 1) + 1 + slots]
    redis.call('INCRBY', slot, reserve)
    redis.call('PEXPIRE', slot, ttl)
  end
end
return levels
"""

_SETTLE = """
-- KEYS: ARGV[1] spent keys, then the held slots to release. ARGV: count of spent keys, then per spent
-- key: amount, ttl seconds; then per held slot: amount.
local n = tonumber(ARGV[1])
for i = 1, n do
  redis.call('INCRBY', KEYS[i], ARGV[2 * i])
  redis.call('EXPIRE', KEYS[i], ARGV[2 * i + 1])
end
for j = n + 1, #KEYS do
  if redis.call('EXISTS', KEYS[j]) == 1 then
    if redis.call('DECRBY', KEYS[j], ARGV[2 * n + 1 + j - n]) < 0 then redis.call('SET', KEYS[j], 0, 'KEEPTTL') end
  end
end
return 0
"""


class RedisState:
    """The state store in Redis, through redis-py's asyncio client and its connection pool."""

    shared = True

    def __init__(self, config: StateConfig, client: aioredis.Redis | None = None) -> None:
        if config.redis_url is None and client is None:
            raise ValueError("RedisState needs router.state.redis_url")
        self._timeout = config.timeout_s
        self.client: aioredis.Redis = client or aioredis.Redis.from_url(
            config.redis_url or "",
            socket_timeout=config.timeout_s,
            socket_connect_timeout=config.timeout_s,
            max_connections=config.max_connections,
            retry=Retry(NoBackoff(), 0),  # a failure is reported at once: the caller fails open or closed
            health_check_interval=0,
        )
        self._prefix = "{" + config.key_prefix + "}"
        self._slot_s = max(1, min(SLOT_S, math.ceil(config.reservation_ttl_s)))
        self._slots = math.ceil(config.reservation_ttl_s / self._slot_s) + 1
        self._slot_ttl_ms = int((config.reservation_ttl_s + self._slot_s) * 1000)
        self._admit = self.client.register_script(_ADMIT)
        self._settle = self.client.register_script(_SETTLE)

    def spent_key(self, scope: str, name: str, ident: str) -> str:
        return f"{self._prefix}:spent:{scope}:{quote(name, safe='')}:{ident}"

    def _held_key(self, scope: str, name: str, slot: int) -> str:
        return f"{self._prefix}:held:{scope}:{quote(name, safe='')}:{slot}"

    async def _call(self, what: str, run: Any) -> Any:
        try:
            async with asyncio.timeout(self._timeout):
                return await run
        except TimeoutError:
            raise StateError(f"redis {what}: no answer within {self._timeout * 1000:g} ms") from None
        except RedisError as exc:
            raise StateError(f"redis {what}: {type(exc).__name__}") from None
        except OSError as exc:
            raise StateError(f"redis {what}: {exc.strerror or type(exc).__name__}") from None

    async def admit(self, ask: Ask, now: float) -> Grant:
        slot = int(now // self._slot_s)
        limit = ask.rate_limit
        keys = [f"{self._prefix}:rate:{quote(ask.key, safe='')}"]
        args: list[Any] = [limit.requests_per_minute / 60.0 if limit else 0, bucket_capacity(limit) if limit else 0,
                           self._slots, self._slot_ttl_ms]
        for check in ask.budgets:
            keys.append(self.spent_key(check.scope, check.name, period_id(check.period, now)))
            keys.extend(self._held_key(check.scope, check.name, s) for s in range(slot - self._slots + 1, slot + 1))
            args += [check.limit, check.reserve, 1 if check.scope == SCOPE_KEY else 0]
        answer = await self._call("admit", self._admit(keys=keys, args=args))
        if answer[0] == 1:
            assert limit is not None
            raise rate_limited(ask.key, limit, int(answer[1]) / 1000)
        if answer[0] == 2:
            raise quota_exceeded(ask.key, ask.budgets[int(answer[1]) - 1])
        levels, holds = [], []
        for i, check in enumerate(ask.budgets):
            level = Level(check.scope, check.name, int(answer[1 + 2 * i]), int(answer[2 + 2 * i]), check.limit)
            levels.append(level)
            if check.reserve > 0 and not level.exhausted:
                where = self._held_key(check.scope, check.name, slot)
                holds.append(Hold(check.scope, check.name, check.reserve, where))
        return Grant(tuple(levels), tuple(holds))

    async def settle(self, charges: Sequence[Charge], holds: Sequence[Hold], now: float) -> None:
        keys: list[str] = []
        args: list[Any] = [len(charges) * len(Period)]
        for charge in charges:
            for period in Period:
                keys.append(self.spent_key(charge.scope, charge.name, period_id(period, now)))
                args += [charge.amount, _SPENT_TTL_S[period]]
        keys.extend(hold.where for hold in holds)
        args.extend(hold.amount for hold in holds)
        await self._call("settle", self._settle(keys=keys, args=args))

    async def spent(self, scope: str, names: Sequence[str], period: Period, now: float) -> dict[str, int]:
        ident = period_id(period, now)
        values = await self._call("read", self.client.mget([self.spent_key(scope, n, ident) for n in names]))
        return {name: int(value or 0) for name, value in zip(names, values, strict=True)}

    async def aclose(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self.client.aclose()
