"""``openweight spend --config FILE``: the current period's spend per key and per provider.

With shared state (``router.state.redis_url``) the figures are the ones budgets are checked against:
today's and this month's (UTC) spend of every key and provider that spent anything, next to its
budget. Without it each router counts only its own, so the command reads a running router's
``/metrics`` instead (``--url``; default the config's ``router.host``/``router.port``): the spend
since that router started, which is all an in-process router knows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import urllib.request
from typing import Any
from urllib.parse import unquote

from router.auth import KeyStore
from router.config_file import load_settings
from router.redaction import redact_url
from router.settings import Settings
from router.spend_config import Budget, Period
from router.state import NANO_USD, SCOPE_KEY, SCOPE_PROVIDER, SCOPES, StateError, period_id

SCAN_TIMEOUT_S = 30.0
"""Longest the listing of spend keys in Redis may take."""

Row = dict[str, Any]


def budgets(settings: Settings) -> dict[tuple[str, str], Budget]:
    """(scope, name) -> budget, for every key (keys file) and provider that has one."""
    found = {(SCOPE_PROVIDER, name): p.budget for name, p in settings.providers.items() if p.budget is not None}
    for principal in KeyStore.from_config(settings.router.auth).principals:
        if principal.budget is not None:
            found[(SCOPE_KEY, principal.name)] = principal.budget
    return found


async def from_redis(settings: Settings, now: float) -> list[Row]:
    """Every key's and provider's spend today and this month, from the shared state."""
    from redis.exceptions import RedisError

    from router.state_redis import RedisState

    config = settings.router.state.model_copy(update={"timeout_s": max(2.0, settings.router.state.timeout_s)})
    state = RedisState(config)
    limits = budgets(settings)
    try:
        names: dict[str, set[str]] = {scope: {n for s, n in limits if s == scope} for scope in SCOPES}
        async with asyncio.timeout(SCAN_TIMEOUT_S):  # the client bounds single calls only (RedisState._call)
            for scope in SCOPES:
                for period in Period:
                    pattern = state.spent_key(scope, "*", period_id(period, now)).replace("%2A", "*")
                    async for key in state.client.scan_iter(match=pattern, count=500):
                        names[scope].add(unquote(key.decode().split(":")[-2]))
        rows = []
        for scope in SCOPES:
            ordered = sorted(names[scope])
            day = await state.spent(scope, ordered, Period.DAY, now)
            month = await state.spent(scope, ordered, Period.MONTH, now)
            rows += [_row(scope, n, day[n], month[n], limits.get((scope, n))) for n in ordered]
        return rows
    except RedisError as exc:
        raise StateError(f"redis: {type(exc).__name__}") from None
    except TimeoutError:
        raise StateError(f"redis: the key scan took over {SCAN_TIMEOUT_S:g} s") from None
    finally:
        await state.aclose()


def _row(scope: str, name: str, day: int, month: int, budget: Budget | None) -> Row:
    row: Row = {"scope": scope, "name": name, "day_usd": day / NANO_USD, "month_usd": month / NANO_USD}
    if budget is not None:
        spent = row["day_usd"] if budget.period is Period.DAY else row["month_usd"]
        row.update(budget_usd=budget.usd, budget_period=budget.period.value, budget_used=spent / budget.usd)
    return row


def from_metrics(url: str) -> list[Row]:
    """Spend since a router started, by key and by provider, from its /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as answer:
        text = answer.read().decode()
    totals: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "openweight_spend_usd":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total"):
                for scope, label in ((SCOPE_KEY, "key"), (SCOPE_PROVIDER, "upstream")):
                    where = (scope, sample.labels[label])
                    totals[where] = totals.get(where, 0.0) + sample.value
    return [{"scope": scope, "name": name, "since_start_usd": usd} for (scope, name), usd in sorted(totals.items())]


def table(rows: list[Row]) -> str:
    if not rows:
        return "no spend recorded"
    columns = [c for c in ("scope", "name", "day_usd", "month_usd", "since_start_usd", "budget_usd",
                           "budget_period", "budget_used") if any(c in r for r in rows)]

    def cell(row: Row, column: str) -> str:
        value = row.get(column, "")
        if column == "budget_used" and value != "":
            return f"{value:.0%}"
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    cells = [columns, *[[cell(r, c) for c in columns] for r in rows]]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in cells)


def run(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    now = time.time()
    url = settings.router.state.redis_url
    if url is not None and not args.url:
        try:
            rows = asyncio.run(from_redis(settings, now))
        except StateError as exc:
            print(f"openweight spend: cannot read {redact_url(url, query=True)}: {exc}", file=sys.stderr)
            return 1
        source = (f"{redact_url(url, query=True)}: today {period_id(Period.DAY, now)}, "
                  f"this month {period_id(Period.MONTH, now)} (UTC)")
    else:
        host = settings.router.host if settings.router.host not in ("0.0.0.0", "::") else "127.0.0.1"
        metrics = args.url or f"http://{host}:{settings.router.port}/metrics"
        try:
            rows = from_metrics(metrics)
        except OSError as exc:  # urllib's URLError and HTTPError are OSErrors
            print(f"openweight spend: cannot read {metrics}: {exc}; no shared state is configured, so the "
                  "spend is read from a running router (--url)", file=sys.stderr)
            return 1
        source = f"{metrics}: since that router started (no shared state: each router counts its own)"
    if args.json:
        print(json.dumps({"source": source, "rows": rows}, indent=2))
    else:
        print(f"spend from {source}\n{table(rows)}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``spend`` to the ``openweight`` command line."""
    spend = subparsers.add_parser("spend", help="the current period's spend per key and per provider",
                                  description=__doc__)
    spend.add_argument("--config", help="config file (default: $OPENWEIGHT_CONFIG)")
    spend.add_argument("--url", help="a running router's /metrics URL (instead of the shared state)")
    spend.add_argument("--json", action="store_true", help="print JSON instead of a table")
    spend.set_defaults(func=run)
