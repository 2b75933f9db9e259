"""What the spend and shared-state tests share: a priced config, keys with limits, concurrent load."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx

from router.auth import KeyStore
from router.settings import ApiKey, Settings
from router.testing import PROMPT_TOKENS, FakeUpstream
from tests.support import MODEL

PRICE = {"input_per_mtok": 1000.0, "output_per_mtok": 2000.0}
COMPLETION = 5
"""Completion tokens of every fake answer (its default chunks)."""
COST = (PROMPT_TOKENS * 1000.0 + COMPLETION * 2000.0) / 1e6
"""USD of one fake answer at :data:`PRICE`: 0.017."""

RATE_KEY, BUDGET_KEY, FREE_KEY = "ow-rate-key", "ow-budget-key", "ow-free-key"


def settled(read: Callable[[], float], expected: float, timeout_s: float = 5.0) -> float:
    """`read()` once it equals `expected` (settlement runs after the answer, batched), else its last value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = read()
        if abs(value - expected) < 1e-9 or time.monotonic() > deadline:
            return value
        time.sleep(0.02)


def keys(budget_usd: float = 0.05, rate: int = 6) -> KeyStore:
    return KeyStore([
        ApiKey(name="team-rate", key=RATE_KEY, rate_limit={"requests_per_minute": rate, "burst": rate}),
        ApiKey(name="team-budget", key=BUDGET_KEY, budget={"usd": budget_usd, "period": "day"}),
        ApiKey(name="team-free", key=FREE_KEY),
    ])


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def settings(providers: dict[str, FakeUpstream], *, cluster: FakeUpstream | None = None,
             policy: str = "provider_only", budgets: dict[str, dict[str, Any]] | None = None,
             state: dict[str, Any] | None = None, serve: dict[str, Any] | None = None) -> Settings:
    """Model `m1` with each provider priced at :data:`PRICE`, in order; `budgets` by provider."""
    fast = {"probe": False, "first_byte_timeout_s": 5, "circuit": {"failure_threshold": 3, "reset_timeout_s": 0.5}}
    budgets = budgets or {}
    return Settings(
        router={"probe_interval_s": 3600, "retry": {"max_attempts": 1}, "state": state or {}},
        cluster={"url": cluster.url if cluster else "http://127.0.0.1:9/v1", "enabled": cluster is not None, **fast},
        providers={name: {"url": p.url, **fast, **({"budget": budgets[name]} if name in budgets else {})}
                   for name, p in providers.items()},
        models={MODEL: {"policy": policy, "serve": serve,
                        "fallbacks": [{"provider": n, "model": f"{n}-model", "price": PRICE} for n in providers]}},
    )


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **extra}


async def _post_all(urls: list[str], key: str, body: dict[str, Any]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(urls))
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        return await asyncio.gather(*(client.post(f"{url}/v1/chat/completions", json=body, headers=bearer(key))
                                      for url in urls))


def concurrently(urls: list[str], key: str, body: dict[str, Any]) -> list[httpx.Response]:
    """One request per entry of `urls`, all at once."""
    return asyncio.run(_post_all(urls, key, body))
