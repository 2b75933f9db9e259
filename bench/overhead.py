"""`openweight bench overhead`: what a router adds on top of a fast upstream - openweight and LiteLLM.

One fake upstream (``python -m router.testing``) answers at once; a second fake is every router's
fallback provider (configured, never used while the first answers). The same requests go straight
to the fake (``direct``), through ``floor`` (:mod:`bench.floor`: a bare pass-through proxy on
uvicorn, the least any Python proxy on this stack costs; ``floor-aiohttp``: the same with the
router's HTTP client), through openweight and through LiteLLM's
proxy, plain and streaming, at each concurrency, the targets taking turns so that they share the
machine's conditions. Reported: requests/s, latency percentiles, the latency added over
``direct``, errors, and CPU per request of each proxy process (LiteLLM: its whole process tree) and
of the fake upstream (a bare uvicorn ASGI server).

All processes share the machine's cores: on a small machine the load generator's own CPU shapes
the throughput and latency columns; the CPU columns do not depend on it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
from pathlib import Path
from typing import Any

from bench import litellm, report
from bench.harness import percentile, run_load, workspace
from bench.report import Column
from bench.servers import MODEL, fake_upstream, floor_proxy, openweight, router_config
from router.net import free_port

TARGETS = ("direct", "floor", "floor-aiohttp", "openweight", "litellm")

COLUMNS = [
    Column("target", "target", 10), Column("mode", "mode", 6), Column("concurrency", "conc", 4),
    Column("rps", "req/s", 8, 1), Column("p50_ms", "p50 ms", 8), Column("p99_ms", "p99 ms", 8),
    Column("added_p50_ms", "+p50 ms", 8), Column("added_p99_ms", "+p99 ms", 8),
    Column("cpu_ms_per_request", "cpu ms/req", 10, 3), Column("cpu_us_per_chunk", "cpu us/chunk", 12, 1),
    Column("marginal_us_per_chunk", "marginal us/chunk", 17, 1),
    Column("upstream_cpu_ms_per_request", "fake ms/req", 11, 3), Column("errors", "errors", 6),
]


def request_body(stream: bool, chunks: int) -> bytes:
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Say something."}],
                       "max_tokens": chunks, "stream": stream}).encode()


def _row(target: str, stream: bool, concurrency: int, requests: int, chunks: int, load: Any,
         pids: dict[str, int]) -> dict[str, Any]:
    latencies = sorted(r.seconds for r in load.results if r.ok)
    errors = len(load.results) - len(latencies)
    kinds = collections.Counter(r.error or (f"status {r.status}" if r.status != 200 else "incomplete stream")
                                for r in load.results if not r.ok)
    row: dict[str, Any] = {
        "target": target, "mode": "stream" if stream else "plain", "concurrency": concurrency,
        "requests": len(load.results), "errors": errors, "error_kinds": dict(kinds), "seconds": round(load.seconds, 3),
        "rps": round(len(latencies) / load.seconds, 1),
        "p50_ms": round(percentile(latencies, 0.5) * 1000, 3), "p99_ms": round(percentile(latencies, 0.99) * 1000, 3),
    }
    if "router" in pids:
        cpu = load.cpu_s["router"]
        row["cpu_ms_per_request"] = round(cpu * 1000 / requests, 3)
        if stream:
            row["cpu_us_per_chunk"] = round(cpu * 1e6 / (requests * chunks), 2)
    row["upstream_cpu_ms_per_request"] = round(load.cpu_s["upstream"] * 1000 / requests, 3)
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every scenario; prints the table, writes JSON and the chart; returns the report."""
    targets = list(args.targets)
    settings = {"requests": args.requests, "litellm_requests": args.litellm_requests, "chunks": args.chunks,
                "chunk_delay_s": args.chunk_delay_s, "concurrency": args.concurrency,
                "targets": targets, "litellm": litellm.VERSION if "litellm" in targets else None}
    result = report.new_report(args.suite, settings)
    if "litellm" in targets:
        litellm.ensure_installed()
    with workspace() as (directory, log), contextlib.ExitStack() as stack:
        primary, fallback = free_port(), free_port()
        pace = args.chunk_delay_s
        upstream = stack.enter_context(fake_upstream(primary, log, chunks=args.chunks, chunk_delay_s=pace))
        stack.enter_context(fake_upstream(fallback, log, chunks=args.chunks, chunk_delay_s=pace))
        primary_url, fallback_url = f"http://127.0.0.1:{primary}/v1", f"http://127.0.0.1:{fallback}/v1"
        urls: dict[str, tuple[str, dict[str, int]]] = {"direct": (primary_url, {})}
        for floor, client in (("floor", "minimal"), ("floor-aiohttp", "aiohttp")):
            if floor in targets:
                port = free_port()
                process = stack.enter_context(floor_proxy(port, f"http://127.0.0.1:{primary}", log, client))
                urls[floor] = (f"http://127.0.0.1:{port}/v1", {"router": process.pid})
        if "openweight" in targets:
            port = free_port()
            config = router_config(primary_url, fallback_url)
            process = stack.enter_context(openweight(config, port, directory, log))
            urls["openweight"] = (f"http://127.0.0.1:{port}/v1", {"router": process.pid})
        if "litellm" in targets:
            port = free_port()
            peer = litellm.config(MODEL, primary_url, fallback_url)
            process = stack.enter_context(litellm.proxy(peer, port, directory, log))
            urls["litellm"] = (f"http://127.0.0.1:{port}/v1", {"router": process.pid})
        for stream in (False, True):
            for concurrency in args.concurrency:
                rows = []
                for target in targets:
                    url, pids = urls[target]
                    watch = {**pids, "upstream": upstream.pid}
                    count = args.litellm_requests if target == "litellm" else args.requests
                    load = asyncio.run(run_load(f"{url}/chat/completions", request_body(stream, args.chunks),
                                                concurrency=concurrency, requests=count, watch=watch))
                    rows.append(_row(target, stream, concurrency, count, args.chunks, load, pids))
                _added(rows)
                result["rows"] += rows
    _marginal(result["rows"], args.chunks)
    result["summary"] = summary(result["rows"])
    result["failed"] = any(row["errors"] for row in result["rows"] if row["target"] != "litellm")
    errors = [f"{r['target']} {r['mode']} {r['concurrency']}: {r['error_kinds']}"
              for r in result["rows"] if r["errors"]]
    text = report.table(result["rows"], COLUMNS) + "\n\n" + "\n".join(result["summary"])
    if errors:
        text += "\nerrors: " + "; ".join(errors)
    files = report.finish(result, text, args.out, chart if args.chart else None)
    if getattr(args, "json_out", None):
        Path(args.json_out).write_text(files["json"].read_text())
    return result


def _added(rows: list[dict[str, Any]]) -> None:
    direct = next((r for r in rows if r["target"] == "direct"), None)
    for row in rows:
        if direct is not None and row is not direct:
            row["added_p50_ms"] = round(row["p50_ms"] - direct["p50_ms"], 3)
            row["added_p99_ms"] = round(row["p99_ms"] - direct["p99_ms"], 3)


def _marginal(rows: list[dict[str, Any]], chunks: int) -> None:
    """What relaying one more chunk costs: (stream - plain CPU per request) / chunks, same target and
    concurrency. ``cpu_us_per_chunk`` also spreads the request's own cost over its chunks."""
    plain = {(r["target"], r["concurrency"]): r.get("cpu_ms_per_request") for r in rows if r["mode"] == "plain"}
    for row in rows:
        base = plain.get((row["target"], row["concurrency"]))
        if row["mode"] == "stream" and base is not None and row.get("cpu_ms_per_request") is not None:
            row["marginal_us_per_chunk"] = round((row["cpu_ms_per_request"] - base) * 1000 / chunks, 2)


def summary(rows: list[dict[str, Any]]) -> list[str]:
    """One line per mode: each router's CPU per request over the runs, and LiteLLM's over openweight's."""
    lines = []
    for mode in ("plain", "stream"):
        cpu: dict[str, list[float]] = {}
        for row in rows:
            if row["mode"] == mode and row.get("cpu_ms_per_request") is not None:
                cpu.setdefault(row["target"], []).append(row["cpu_ms_per_request"])
        if not cpu:
            continue
        parts = [f"{t} {min(v):.3f}-{max(v):.3f} ms" for t, v in cpu.items()]
        line = f"{mode}: CPU per request " + ", ".join(parts)
        if "openweight" in cpu and "litellm" in cpu:
            ratio = sum(cpu["litellm"]) / sum(cpu["openweight"])
            line += f"; LiteLLM / openweight = {ratio:.1f}x"
        lines.append(line)
    return lines


def chart(result: dict[str, Any]) -> Any:
    rows = result["rows"]
    fig, (cpu_ax, rps_ax, p50_ax) = report.figure(3, f"openweight bench overhead - {result['date'][:10]}, "
                                                     f"{result['machine']['cores']} cores")
    styles = {"direct": "tab:gray", "floor": "tab:green", "floor-aiohttp": "tab:olive", "openweight": "tab:blue",
              "litellm": "tab:red"}
    for target, color in styles.items():
        for mode, line in (("plain", "-"), ("stream", "--")):
            picked = [r for r in rows if r["target"] == target and r["mode"] == mode]
            if not picked:
                continue
            xs = [r["concurrency"] for r in picked]
            label = f"{target} {mode}"
            if target != "direct":
                cpu_ax.plot(xs, [r["cpu_ms_per_request"] for r in picked], line, color=color, marker="o", label=label)
            else:
                cpu_ax.plot(xs, [r["upstream_cpu_ms_per_request"] for r in picked], line, color=color, marker=".",
                            label=f"fake upstream {mode}")
            rps_ax.plot(xs, [r["rps"] for r in picked], line, color=color, marker="o", label=label)
            p50_ax.plot(xs, [r["p50_ms"] for r in picked], line, color=color, marker="o", label=label)
    levels = sorted({r["concurrency"] for r in rows})
    for ax, title in ((cpu_ax, "CPU ms per request (gray: the fake upstream)"), (rps_ax, "requests/s"),
                      (p50_ax, "p50 latency, ms")):
        report.log_axis(ax, "x", base=2)
        logarithmic = report.log_axis(ax, "y")
        ax.set_xticks(levels, [str(level) for level in levels])
        ax.minorticks_off()
        ax.set_xlabel("concurrency")
        ax.set_title(title + (" (log)" if logarithmic else ""), fontsize=9)
        ax.grid(True, alpha=0.3)
    rps_ax.legend(fontsize=7, loc="lower left")
    return fig
