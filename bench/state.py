"""The overhead suite's shared-state targets: what rate limits, budgets and spend cost per request.

``openweight-keyed`` and ``openweight-redis`` are the same router and config, in-process state and
shared state (a local ``redis-server``) respectively: one client key with a rate limit and a budget,
and a priced fallback provider with a budget of its own, all far from their limits. The summary line
gives what Redis adds over in-process state: router CPU and p50 per request, same run, same load.

``--state-route`` picks what the requests take: ``cluster`` (the default: the model is self-hosted
first and the cluster serves; the rate token and both budgets are checked in one script call, and
nothing is left to settle) or ``provider`` (the model is provider-only: a reservation is taken
before, and the spend settled after, the answer: two script calls).

End to end, the router's CPU per request moves by a tenth of a millisecond while the machine's
other load moves it by more, so the summary also gives :func:`isolated`: the state steps alone,
both routes, in the benchmark's own process, Redis against in-process.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from bench.servers import MODEL
from router.redis_testing import RedisServer

KEYED = "openweight-keyed"
REDIS = "openweight-redis"
TARGETS = (KEYED, REDIS)
KEY = "bench-key"
HEADERS = {"authorization": f"Bearer {KEY}"}
"""What the load generator sends to these targets."""
_PROVIDER = "paid"


ROUTES = ("cluster", "provider")


def config(upstream_url: str, directory: Path, redis_url: str | None, route: str = "cluster") -> dict[str, Any]:
    """The router config of both targets (`redis_url`: shared state on); `upstream_url` serves as the
    cluster (`route` cluster) or as the provider (`route` provider)."""
    keys_file = directory / "bench-keys.yaml"
    keys_file.write_text(yaml.safe_dump([{
        "name": "bench", "key": KEY,
        "rate_limit": {"requests_per_minute": 1e9}, "budget": {"usd": 1e6, "period": "month"},
    }]))
    router: dict[str, Any] = {"auth": {"keys_file": str(keys_file)}, "probe_interval_s": 3600}
    if redis_url is not None:
        router["state"] = {"redis_url": redis_url}
    on_cluster = route == "cluster"
    return {
        "router": router,
        # The fake serves the API at its URL itself, as a classic Serve ingress does.
        "cluster": {"url": upstream_url, "data_path": "classic", "probe": False} if on_cluster else {"enabled": False},
        # Served from the cluster, the provider is only a fallback (its URL answers nothing).
        "providers": {_PROVIDER: {"url": "http://127.0.0.1:9/v1" if on_cluster else upstream_url, "probe": False,
                                  "budget": {"usd": 1e6, "period": "month"}}},
        "models": {MODEL: {"policy": "self_hosted_first" if on_cluster else "provider_only", "fallbacks": [
            {"provider": _PROVIDER, "model": MODEL, "price": {"input_per_mtok": 0.1, "output_per_mtok": 0.2}}]}},
    }


@contextlib.contextmanager
def redis_if(wanted: bool) -> Iterator[RedisServer | None]:
    """A loopback redis-server for the ``openweight-redis`` target, when it is asked for."""
    if not wanted:
        yield None
        return
    with RedisServer() as server:
        yield server


def summary(rows: list[dict[str, Any]]) -> list[str]:
    """Per mode and concurrency: router CPU and p50 that shared state adds over in-process state."""
    lines = []
    keyed = {(r["mode"], r["concurrency"]): r for r in rows if r["target"] == KEYED}
    for row in rows:
        base = keyed.get((row["mode"], row["concurrency"]))
        if row["target"] != REDIS or base is None or row.get("cpu_ms_per_request") is None:
            continue
        cpu = row["cpu_ms_per_request"] - base["cpu_ms_per_request"]
        p50 = row["p50_ms"] - base["p50_ms"]
        redis_cpu = row.get("redis_cpu_ms_per_request")
        lines.append(f"redis state, {row['mode']} c={row['concurrency']}: +{cpu:.3f} ms router CPU, +{p50:.3f} ms p50 "
                     f"per request over in-process state" + (f"; redis-server {redis_cpu:.3f} ms CPU"
                                                            if redis_cpu is not None else ""))
    return lines


async def _spend_path_cpu_us(settings: Any, shared: Any, route: str, requests: int) -> float:
    """CPU microseconds per request of the state steps alone (admit, settle) in this process."""
    import time

    from router.auth import Principal
    from router.health import Health
    from router.metrics import Metrics
    from router.schemas import Endpoint, parse_request
    from router.settings import CLUSTER, CircuitConfig, RateLimit
    from router.spend import Spend
    from router.spend_config import Budget, Period
    from router.state import LocalState

    principal = Principal("bench", rate_limit=RateLimit(requests_per_minute=1e9),
                          budget=Budget(usd=1e6, period=Period.MONTH))
    body = b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "Say something."}]}'
    parsed = parse_request(Endpoint.CHAT, body)
    snapshot = Health({CLUSTER: CircuitConfig(), _PROVIDER: CircuitConfig()}).snapshot()
    spend = Spend(settings, Metrics(), LocalState(), shared)
    upstream = CLUSTER if route == "cluster" else _PROVIDER
    for warm in (True, False):
        started = time.process_time()
        for _ in range(200 if warm else requests):
            spend.check_rate(principal)
            ticket = await spend.admit(principal, parsed, snapshot)
            await spend.settle(ticket, upstream, {upstream: (7, 5)}, served=True)
    return (time.process_time() - started) * 1e6 / requests


def isolated(directory: Path, requests: int = 3000) -> list[str]:
    """What the state steps cost the router's CPU per request, Redis against in-process, measured in
    this process alone (no HTTP, no load generator): far less noisy on a busy machine."""
    import asyncio

    from router.settings import Settings
    from router.state_redis import RedisState

    async def measure(settings: Any, store: Any, route: str) -> float:
        try:
            return await _spend_path_cpu_us(settings, store, route, requests)
        finally:
            if store is not None:
                await store.aclose()

    lines = []
    with RedisServer() as server:
        for route in ROUTES:
            cpu = {}
            for shared in (False, True):
                raw = config("http://127.0.0.1:9/v1", directory, server.url if shared else None, route)
                if shared:  # a loaded machine must not turn a slow answer into a skipped call
                    raw["router"]["state"]["timeout_s"] = 2.0
                settings = Settings(**raw)
                cpu[shared] = asyncio.run(measure(settings, RedisState(settings.router.state) if shared else None,
                                                  route))
            lines.append(f"redis state, isolated ({route} route, {requests} requests): {cpu[False]:.0f} us "
                         f"in-process, {cpu[True]:.0f} us with Redis: +{(cpu[True] - cpu[False]) / 1000:.3f} ms "
                         "router CPU per request")
    return lines
