"""`openweight bench failover`: time to first token while the primary upstream fails, and back.

The primary (the cluster's place) and the fallback provider are fake upstreams of their own
processes. For each router (openweight, LiteLLM) and each fault:

- ``refuse``: nothing listens on the primary's port (connection refused);
- ``hang``: the primary accepts connections and never answers (its model list neither);
- ``503``: the primary answers every request with 503 (no Retry-After);

the router starts with a healthy primary, then the fault begins and one client sends streaming
requests one after another. Reported: time to first token (TTFT) of the requests that still tried
the primary (before its circuit opened) and of those that did not (after), each also as the time
added over the same router's TTFT with a healthy primary; how many requests tried the primary; then
the primary recovers and the time until a request is served by it again is measured (one request
every ``--recovery-interval`` seconds). Both routers get the same first-byte timeout (``--timeout``)
and no retries of the primary; every other setting is each router's default, listed in the report.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from bench import litellm, names, report
from bench.harness import Result, client_session, fetch, percentile, workspace
from bench.overhead import request_body
from bench.report import Column
from bench.servers import MODEL, fake_upstream, openweight, router_config
from router.net import free_port

FAULTS = ("refuse", "hang", "503")
ROUTERS = ("openweight", "litellm")
_HEADERS = ("x-openweight-upstream", "x-openweight-attempts", "x-litellm-model-api-base",
            "x-litellm-attempted-fallbacks")

COLUMNS = [
    Column("router", "router", 10), Column("fault", "fault", 6),
    Column("healthy_ttft_ms", "healthy ms", 10), Column("tried_primary", "tried", 5),
    Column("ttft_before_open_p50_ms", "before p50", 10), Column("added_before_open_ms", "+before", 8),
    Column("ttft_after_open_p50_ms", "after p50", 9), Column("added_after_open_ms", "+after", 8),
    Column("ttft_after_open_max_ms", "after max", 9), Column("recovery_s", "back s", 7),
    Column("errors", "errors", 6),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--routers", type=names(ROUTERS), default=list(ROUTERS), help="openweight, litellm")
    parser.add_argument("--faults", type=names(FAULTS), default=list(FAULTS), help="refuse, hang, 503")
    parser.add_argument("--requests", type=int, default=30, help="requests sent after the fault begins")
    parser.add_argument("--timeout", type=float, default=1.0,
                        help="first-byte timeout towards the primary, seconds (both routers)")
    parser.add_argument("--recovery-interval", type=float, default=0.05,
                        help="seconds between requests while waiting for the primary to serve again")
    parser.add_argument("--recovery-limit", type=float, default=60.0, help="give up waiting after this long")
    parser.add_argument("--chunks", type=int, default=20, help="tokens per streamed answer")


def _served_by_primary(result: Result, primary_url: str) -> bool:
    return (result.headers.get("x-openweight-upstream") == "cluster"
            or result.headers.get("x-litellm-model-api-base", "").rstrip("/") == primary_url)


def _tried_primary(result: Result) -> bool:
    """Whether the router attempted the primary before the upstream that served."""
    if "x-openweight-attempts" in result.headers:
        return int(result.headers["x-openweight-attempts"]) > 1
    return int(result.headers.get("x-litellm-attempted-fallbacks", "0")) > 0


async def _sequence(url: str, body: bytes, count: int) -> list[tuple[float, Result]]:
    started = time.perf_counter()
    out = []
    async with client_session() as session:
        for _ in range(count):
            result = await fetch(session, url, body, keep_headers=_HEADERS)
            out.append((result.started_at - started, result))
    return out


async def _until_primary(url: str, body: bytes, primary_url: str, interval: float, limit: float
                         ) -> tuple[float | None, list[Result]]:
    started = time.perf_counter()
    results = []
    async with client_session() as session:
        while time.perf_counter() - started < limit:
            result = await fetch(session, url, body, keep_headers=_HEADERS)
            results.append(result)
            if result.ok and _served_by_primary(result, primary_url):
                return result.started_at - started, results
            await asyncio.sleep(interval)
    return None, results


def _ms(values: list[float], q: float) -> float | None:
    return round(percentile(sorted(values), q) * 1000, 2) if values else None


@contextlib.contextmanager
def _router(name: str, primary_url: str, fallback_url: str, timeout: float, directory: Path,
            log: IO[bytes]) -> Iterator[tuple[str, dict[str, Any]]]:
    port = free_port()
    if name == "openweight":
        upstream = {"connect_timeout_s": timeout, "first_byte_timeout_s": timeout}
        config = router_config(primary_url, fallback_url, cluster=upstream, provider=upstream)
        with openweight(config, port, directory, log):
            yield f"http://127.0.0.1:{port}/v1", config
    else:
        config = litellm.config(MODEL, primary_url, fallback_url, timeout_s=timeout)
        with litellm.proxy(config, port, directory, log):
            yield f"http://127.0.0.1:{port}/v1", config


def _scenario(name: str, fault: str, args: argparse.Namespace, fallback_url: str, directory: Path,
              log: IO[bytes]) -> dict[str, Any]:
    primary = free_port()
    primary_url = f"http://127.0.0.1:{primary}/v1"
    body = request_body(True, args.chunks)
    row: dict[str, Any] = {"router": name, "fault": fault}
    with _router(name, primary_url, fallback_url, args.timeout, directory, log) as (url, config), \
            contextlib.ExitStack() as faulty:
        endpoint = f"{url}/chat/completions"
        with fake_upstream(primary, log, chunks=args.chunks):
            healthy = asyncio.run(_sequence(endpoint, body, 30))[10:]
        row["healthy_ttft_ms"] = _ms([r.ttft_s or 0.0 for _, r in healthy], 0.5)
        if fault != "refuse":
            faulty.enter_context(fake_upstream(primary, log, chunks=args.chunks, status=503 if fault == "503" else 200,
                                               hang=fault == "hang"))
        during = asyncio.run(_sequence(endpoint, body, args.requests))
        faulty.close()
        with fake_upstream(primary, log, chunks=args.chunks):
            back_s, _ = asyncio.run(_until_primary(endpoint, body, primary_url, args.recovery_interval,
                                                   args.recovery_limit))
    before = [r.ttft_s or 0.0 for _, r in during if r.ok and _tried_primary(r)]
    after = [r.ttft_s or 0.0 for _, r in during if r.ok and not _tried_primary(r)]
    base = row["healthy_ttft_ms"]
    row.update({
        "tried_primary": len(before),
        "ttft_before_open_p50_ms": _ms(before, 0.5), "ttft_before_open_max_ms": _ms(before, 1.0),
        "ttft_after_open_p50_ms": _ms(after, 0.5), "ttft_after_open_max_ms": _ms(after, 1.0),
        "recovery_s": round(back_s, 2) if back_s is not None else None,
        "errors": sum(not r.ok for _, r in during),
        "config": config,
        "requests": [{"t_s": round(t, 4), "ttft_ms": round((r.ttft_s or 0) * 1000, 2), "status": r.status,
                      "ok": r.ok, "tried_primary": _tried_primary(r)} for t, r in during],
    })
    if base is not None:
        row["added_before_open_ms"] = round(row["ttft_before_open_p50_ms"] - base, 2) if before else None
        row["added_after_open_ms"] = round(row["ttft_after_open_p50_ms"] - base, 2) if after else None
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every (router, fault) scenario; prints the table, writes JSON and the chart."""
    settings = {"requests": args.requests, "first_byte_timeout_s": args.timeout, "chunks": args.chunks,
                "recovery_interval_s": args.recovery_interval, "litellm": litellm.VERSION}
    result = report.new_report("failover", settings)
    with workspace() as (tmp, log):
        fallback = free_port()
        with fake_upstream(fallback, log, chunks=args.chunks):
            fallback_url = f"http://127.0.0.1:{fallback}/v1"
            for name in args.routers:
                for fault in args.faults:
                    result["rows"].append(_scenario(name, fault, args, fallback_url, tmp, log))
    result["failed"] = any(row["errors"] for row in result["rows"] if row["router"] == "openweight")
    text = report.table(result["rows"], COLUMNS)
    text += ("\n\nTTFT in ms; healthy: through the router with a healthy primary; tried: requests that attempted "
             "the primary;\nbefore/after: requests that did / did not attempt it; +: over healthy; back s: seconds "
             "from the primary's\nrecovery to the first request it served again.")
    report.finish(result, text, args.out, chart if args.chart else None)
    return result


def chart(result: dict[str, Any]) -> Any:
    faults = list(dict.fromkeys(row["fault"] for row in result["rows"]))
    fig, axes = report.figure(len(faults), f"openweight bench failover - time to first token after the primary "
                                           f"fails ({result['date'][:10]})")
    colors = {"openweight": "tab:blue", "litellm": "tab:red"}
    for ax, fault in zip(axes, faults, strict=True):
        for row in (r for r in result["rows"] if r["fault"] == fault):
            seq = row["requests"]
            color = colors.get(row["router"], "tab:gray")
            ax.plot(range(1, len(seq) + 1), [q["ttft_ms"] for q in seq], "-o", color=color, markersize=3,
                    label=f"{row['router']} (healthy {row['healthy_ttft_ms']} ms)")
        report.log_axis(ax, "y")
        ax.set_title(f"primary: {fault}", fontsize=9)
        ax.set_xlabel("request after the fault began")
        ax.set_ylabel("TTFT, ms")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    return fig
