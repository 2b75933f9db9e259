"""Shared state in Redis (``router.state.redis_url``): every router replica sees the same rate limits,
budgets, reservations and spend.

A request costs one round trip before the policy: a Lua script (:data:`_ADMIT`) checks the key's
budget, takes its rate token, then checks and reserves every budget, atomically, so two routers can
never both take a key's last token or both reserve a budget's last dollar. Time is Redis's own
(``TIME``), the same for every router. A settlement after the answer (:data:`_SETTLE`: spend added,
reservations released) is sent at once; those that come while one is on the wire go together in the
next call, so a busy router pays one round trip for many.

Keys (all under one hash tag, ``{prefix}``, so a script's keys share a cluster slot):

- ``{p}:rate:<key>``: the key's token bucket (``tokens``, ``at``), expiring once it would be full.
- ``{p}:spent:<scope>:<name>:<period id>``: nano-USD spent in that day or month, expiring after it.
- ``{p}:held:<scope>:<name>``: a hash of reservations by time slot (a minute, :data:`SLOT_S`, or
  ``reservation_ttl_s`` when shorter). A budget counts the slots of the last ``reservation_ttl_s``
  and the script drops older ones, so a router that dies mid-request leaks its reservations for that
  long (plus a slot) at most.

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
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisError

from router.spend_config import Period, StateConfig
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
-- KEYS[1]: rate bucket (unused when ARGV[1] == 0); then per budget: its spent key, its held hash.
-- ARGV: rate per second, capacity, slot seconds, slots counted, held ttl ms, then per budget: limit,
-- reserve, refuse (1: the key's own budget, refused past it).
-- Returns {0, slot, spent1, held1, ...} admitted; {1, wait ms} rate limited; {2, index} past the key's budget.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate, capacity = tonumber(ARGV[1]), tonumber(ARGV[2])
local slot = math.floor(now / tonumber(ARGV[3]))
local oldest, ttl = slot - tonumber(ARGV[4]) + 1, tonumber(ARGV[5])
local n = (#ARGV - 5) / 3
local levels = {0, slot}
for i = 1, n do
  local spent = tonumber(redis.call('GET', KEYS[2 * i]) or '0')
  local held = 0
  local slots = redis.call('HGETALL', KEYS[2 * i + 1])
  for j = 1, #slots, 2 do
    if tonumber(slots[j]) < oldest then
      redis.call('HDEL', KEYS[2 * i + 1], slots[j])
    else
      held = held + tonumber(slots[j + 1])
    end
  end
  if ARGV[5 + 3 * i] == '1' and spent + held >= tonumber(ARGV[3 + 3 * i]) then
    return {2, i}
  end
  levels[2 * i + 1] = spent
  levels[2 * i + 2] = held
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
  local reserve = tonumber(ARGV[4 + 3 * i])
  if reserve > 0 and levels[2 * i + 1] + levels[2 * i + 2] < tonumber(ARGV[3 + 3 * i]) then
    redis.call('HINCRBY', KEYS[2 * i + 1], slot, reserve)
    redis.call('PEXPIRE', KEYS[2 * i + 1], ttl)
  end
end
return levels
"""

_SETTLE = """
-- KEYS: ARGV[1] spent keys, then held hashes. ARGV: count of spent keys; per spent key: amount, ttl
-- seconds; per held hash: slot, amount to release.
local n = tonumber(ARGV[1])
for i = 1, n do
  redis.call('INCRBY', KEYS[i], ARGV[2 * i])
  redis.call('EXPIRE', KEYS[i], ARGV[2 * i + 1])
end
local base = 2 * n + 1
for j = n + 1, #KEYS do
  local at = base + 2 * (j - n) - 1
  if redis.call('HEXISTS', KEYS[j], ARGV[at]) == 1 then
    if redis.call('HINCRBY', KEYS[j], ARGV[at], -tonumber(ARGV[at + 1])) <= 0 then
      redis.call('HDEL', KEYS[j], ARGV[at])
    end
  end
end
return 0
"""

_Settlement = tuple[Sequence[Charge], Sequence[Hold], float]


class RedisState:
    """The state store in Redis, through redis-py's asyncio client and its connection pool."""

    shared = True

    def __init__(self, config: StateConfig, client: aioredis.Redis | None = None) -> None:
        if config.redis_url is None and client is None:
            raise ValueError("RedisState needs router.state.redis_url")
        self._timeout = config.timeout_s
        self.client: aioredis.Redis = client or aioredis.Redis.from_url(
            config.redis_url or "",
            socket_timeout=None,  # each call is bounded as a whole (_call): no second timer per read and write
            socket_connect_timeout=config.timeout_s,
            max_connections=config.max_connections,
            retry=Retry(NoBackoff(), 0),  # a failure is reported at once: the caller fails open or closed
            health_check_interval=0,
        )
        self._prefix = "{" + config.key_prefix + "}"
        slot_s = max(1, min(SLOT_S, math.ceil(config.reservation_ttl_s)))
        self._slot_args = [slot_s, math.ceil(config.reservation_ttl_s / slot_s) + 1,
                           int((config.reservation_ttl_s + slot_s) * 1000)]
        self._admit = self.client.register_script(_ADMIT)
        self._settle = self.client.register_script(_SETTLE)
        self._pool = self.client.connection_pool
        self._names: dict[tuple[str, str], str] = {}
        self._periods: dict[tuple[Period, int], str] = {}
        self._pending: list[_Settlement] = []
        self._batch: asyncio.Future[None] | None = None
        self._sending = False
        self._flusher: asyncio.Future[None] | None = None

    def _name(self, scope: str, name: str) -> str:
        found = self._names.get((scope, name))
        if found is None:
            found = self._names[(scope, name)] = f"{scope}:{quote(name, safe='')}"
        return found

    def _period(self, period: Period, now: float) -> str:
        minute = int(now // 60)  # UTC days and months start on a minute
        found = self._periods.get((period, minute))
        if found is None:
            if len(self._periods) > 64:
                self._periods.clear()
            found = self._periods[(period, minute)] = period_id(period, now)
        return found

    def spent_key(self, scope: str, name: str, ident: str) -> str:
        return f"{self._prefix}:spent:{self._name(scope, name)}:{ident}"

    def _held_key(self, scope: str, name: str) -> str:
        return f"{self._prefix}:held:{self._name(scope, name)}"

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

    async def _eval(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        """EVALSHA on a pooled connection, loading the script when Redis does not know it (a restart).

        The hot path of every request: a pooled connection used directly costs less than the client's
        generic command path, which adds nothing here (no retries are wanted).
        """
        connection = await self._pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            try:
                await connection.send_command("EVALSHA", script.sha, len(keys), *keys, *args)
                return await connection.read_response()
            except NoScriptError:
                await connection.send_command("SCRIPT", "LOAD", script.script)
                await connection.read_response()
                await connection.send_command("EVALSHA", script.sha, len(keys), *keys, *args)
                return await connection.read_response()
        except BaseException:
            await connection.disconnect(nowait=True)  # an answer may still be on its way: never reuse it
            raise
        finally:
            await self._pool.release(connection)

    async def admit(self, ask: Ask, now: float) -> Grant:
        limit = ask.rate_limit
        keys = [f"{self._prefix}:rate:{quote(ask.key, safe='')}" if limit else f"{self._prefix}:rate"]
        args: list[Any] = [limit.requests_per_minute / 60.0 if limit else 0, bucket_capacity(limit) if limit else 0,
                           *self._slot_args]
        for check in ask.budgets:
            keys += (self.spent_key(check.scope, check.name, self._period(check.period, now)),
                     self._held_key(check.scope, check.name))
            args += (check.limit, check.reserve, 1 if check.scope == SCOPE_KEY else 0)
        answer = await self._call("admit", self._eval(self._admit, keys, args))
        if answer[0] == 1:
            assert limit is not None
            raise rate_limited(ask.key, limit, int(answer[1]) / 1000)
        if answer[0] == 2:
            raise quota_exceeded(ask.key, ask.budgets[int(answer[1]) - 1])
        slot = int(answer[1])
        levels, holds = [], []
        for i, check in enumerate(ask.budgets):
            level = Level(check.scope, check.name, int(answer[2 + 2 * i]), int(answer[3 + 2 * i]), check.limit)
            levels.append(level)
            if check.reserve > 0 and not level.exhausted:
                holds.append(Hold(check.scope, check.name, check.reserve, keys[2 + 2 * i], slot))
        return Grant(tuple(levels), tuple(holds))

    async def settle(self, charges: Sequence[Charge], holds: Sequence[Hold], now: float) -> None:
        """Send the settlement now, or, while another settlement is on the wire, with the next batch."""
        self._pending.append((charges, holds, now))
        if self._sending:
            if self._batch is None:
                self._batch = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._batch)
            return
        await self._send_pending()

    async def _send_pending(self) -> None:
        """Send every queued settlement in one script call; answer the batch waiting on them."""
        self._sending = True
        pending, self._pending = self._pending, []
        batch, self._batch = self._batch, None
        try:
            keys, args = self._settle_call(pending)
            await self._call("settle", self._eval(self._settle, keys, args))
        except StateError as exc:
            if batch is not None:
                batch.set_exception(exc)
                batch.exception()  # each waiter raises it; marked retrieved even when none is left
            raise
        except BaseException:
            if batch is not None:
                batch.set_exception(StateError("redis settle: cancelled"))
                batch.exception()
            raise
        else:
            if batch is not None:
                batch.set_result(None)
        finally:
            self._sending = False
            if self._pending:  # queued while this call was on the wire: the next batch goes now
                self._flusher = asyncio.ensure_future(self._send_quietly())

    async def _send_quietly(self) -> None:
        with contextlib.suppress(StateError):  # its waiters get the error through their batch
            await self._send_pending()

    def _settle_call(self, pending: list[_Settlement]) -> tuple[list[str], list[Any]]:
        spent: dict[str, list[int]] = {}
        released: dict[tuple[str, int], int] = {}
        for charges, holds, now in pending:
            for charge in charges:
                for period in Period:
                    key = self.spent_key(charge.scope, charge.name, self._period(period, now))
                    spent.setdefault(key, [0, _SPENT_TTL_S[period]])[0] += charge.amount
            for hold in holds:
                released[(hold.where, hold.slot)] = released.get((hold.where, hold.slot), 0) + hold.amount
        args: list[Any] = [len(spent)]
        for amount, ttl in spent.values():
            args += (amount, ttl)
        for (_, slot), amount in released.items():
            args += (slot, amount)
        return [*spent, *(where for where, _ in released)], args

    async def spent(self, scope: str, names: Sequence[str], period: Period, now: float) -> dict[str, int]:
        ident = self._period(period, now)
        values = await self._call("read", self.client.mget([self.spent_key(scope, n, ident) for n in names]))
        return {name: int(value or 0) for name, value in zip(names, values, strict=True)}

    async def aclose(self) -> None:
        """Wait for the settlements still on their way, then close the pool."""
        while self._flusher is not None and not self._flusher.done():
            await asyncio.shield(self._flusher)
        with contextlib.suppress(RedisError, OSError):
            await self.client.aclose()
