"""`openweight bench coldstart`: time to first token while a model scaled to zero starts again.

The local stack (``cluster.stack.LocalStack``: a private Ray, the Serve app, vLLM on CPU) serves
the built-in model at ``replicas: {min: 0, max: 1}`` with a short ``downscale_delay_s``; a fake
provider on loopback (``--provider-ttft-s`` before its first token, then ``--provider-chunk-delay-s``
per token) is its fallback. First the provider's own TTFT is measured (the clients straight to it,
10 s). Then, for each target in turn, each starting from zero replicas, ``--clients`` clients
stream chat answers for ``--duration-s`` seconds, one request after another:

- ``serve``: Ray Serve alone (the model's URL on the cluster, which holds a request until a
  replica runs);
- ``router-no-capacity``: the router with ``cluster.capacity.enabled: false``: requests go to the
  cluster, and fall back only after ``first_byte_timeout_s`` (the router's default);
- ``router-capacity``: the router as configured by default: it covers the model from its provider
  while no replica runs, wakes it, and sends traffic back once its probe sees a replica.

Between targets the suite waits until the capacity route shows the model at zero again (running 0,
target 0). Recorded per request: when it started, its TTFT (the first chunk with content), who
served it (``x-openweight-upstream``; ``cluster`` for Serve alone), whether the router tried the
cluster (it served it, or ``x-openweight-attempts`` > 1) and the status. The capacity route is read
every 0.5 s, from before the router starts, for when the model woke and when a replica was ready.
After a failed request a client pauses 1 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
import urllib.request
from pathlib import Path
from typing import IO, Any

import aiohttp

from bench import names, report
from bench.harness import BenchError, client_session, percentile, workspace
from bench.report import Column
from bench.servers import fake_upstream, openweight
from bench.stack import MODEL, local_stack, stack_config, write_config
from router.net import free_port

TARGETS = ("serve", "router-no-capacity", "router-capacity")
PROVIDER_S = 10.0
"""Seconds the clients ask the provider directly, for its own TTFT."""
POLL_S = 0.5
ERROR_PAUSE_S = 1.0

NOTES = """TTFT in ms (the first chunk with content). cluster: requests the cluster served; waited: requests started
before the replica was ready that went to the cluster (first); cold: requests started before the first
cluster-served answer arrived, after: the rest; woke s: the capacity route first showed a replica running,
starting or aimed for (negative: before the load began, while the router started); ready s: it first showed
one running; cluster s: the first cluster-served answer's first token; back s: from ready to the start of the
first request the cluster served after it. Seconds from the start of each target's load."""

COLUMNS = [
    Column("target", "target", 18), Column("requests", "requests", 8), Column("cluster", "cluster", 7),
    Column("waited", "waited", 6), Column("cold_ttft_p50_ms", "cold p50", 9, 0),
    Column("cold_ttft_p99_ms", "cold p99", 9, 0), Column("after_ttft_p50_ms", "after p50", 9, 0),
    Column("woke_s", "woke s", 6, 1), Column("ready_s", "ready s", 7, 1), Column("first_cluster_s", "cluster s", 9, 1),
    Column("back_after_ready_s", "back s", 6, 1), Column("errors", "errors", 6),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration-s", type=float, default=180.0, help="seconds of load per target")
    parser.add_argument("--clients", type=int, default=2, help="concurrent streaming clients")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per answer")
    parser.add_argument("--provider-ttft-s", type=float, default=0.3,
                        help="the fake provider's seconds before its answer starts")
    parser.add_argument("--provider-chunk-delay-s", type=float, default=0.02,
                        help="the fake provider's seconds before each token")
    parser.add_argument("--downscale-delay-s", type=float, default=10.0,
                        help="idle seconds before Serve takes the model back to zero")
    parser.add_argument("--probe-interval-s", type=float, default=5.0,
                        help="the routers' router.probe_interval_s (5: the router's default)")
    parser.add_argument("--targets", type=names(TARGETS), default=list(TARGETS),
                        help="comma-separated: " + ", ".join(TARGETS))


def _capacity(url: str, model_id: str) -> dict[str, int] | None:
    """The model's replica counts on the capacity route (None: no answer)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            counts: dict[str, int] = json.load(response)["models"][model_id]
            return counts
    except (OSError, ValueError, KeyError):
        return None


def _wait_for_zero(url: str, model_id: str, timeout_s: float = 900.0) -> float:
    """Seconds until the capacity route shows the model at zero (running 0, target 0)."""
    started = time.monotonic()
    while not ((now := _capacity(url, model_id)) and now["running"] == 0 and now["target"] == 0):
        if time.monotonic() - started > timeout_s:
            raise BenchError(f"{model_id} not back at zero replicas within {timeout_s:.0f} s (last: {now})")
        time.sleep(2)
    return time.monotonic() - started


def _has_content(line: bytes) -> bool:
    try:
        choices = json.loads(line[6:]).get("choices") or [{}]
    except ValueError:
        return False
    return bool((choices[0].get("delta") or {}).get("content") or choices[0].get("text"))


async def _ask(session: aiohttp.ClientSession, url: str, body: bytes, served_by: str | None,
               started: float) -> dict[str, Any]:
    """One streamed chat request: its start (s from ``started``), TTFT, upstream, status."""
    begin = time.perf_counter()
    record: dict[str, Any] = {"t_s": round(begin - started, 3), "ttft_ms": None, "upstream": served_by,
                              "tried_cluster": served_by == "cluster", "status": 0, "ok": False}
    done, error = False, None
    try:
        async with session.post(url, data=body, headers={"content-type": "application/json"}) as r:
            record["status"] = r.status
            if served_by is None:
                record["upstream"] = r.headers.get("x-openweight-upstream")
                tried = int(r.headers.get("x-openweight-attempts", "1")) > 1
                record["tried_cluster"] = record["upstream"] == "cluster" or tried
            async for line in r.content:
                if record["ttft_ms"] is None and line.startswith(b"data: {") and _has_content(line):
                    record["ttft_ms"] = round((time.perf_counter() - begin) * 1000, 1)
                done = done or line.startswith(b"data: [DONE]")
                error = error or ("error event" if line.startswith(b'data: {"error"') else None)
    except (aiohttp.ClientError, TimeoutError) as exc:
        error = type(exc).__name__
    record["ok"] = record["status"] == 200 and done and error is None and record["ttft_ms"] is not None
    if error:
        record["error"] = error
    return record


class Watch(threading.Thread):
    """Reads the capacity route every :data:`POLL_S` until stopped: (perf_counter, running, starting, target)."""

    def __init__(self, url: str, model_id: str) -> None:
        super().__init__(name="capacity watch", daemon=True)
        self.where = (url, model_id)
        self.samples: list[tuple[float, int, int, int]] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            if (now := _capacity(*self.where)) is not None:
                self.samples.append((time.perf_counter(), now["running"], now["starting"], now["target"]))
            self.stopped.wait(POLL_S)

    def since(self, started: float) -> list[list[float]]:
        """The samples with seconds from ``started`` (negative: before it)."""
        return [[round(t - started, 2), *counts] for t, *counts in self.samples]


async def _load(url: str, body: bytes, clients: int, duration_s: float,
                served_by: str | None) -> tuple[list[dict[str, Any]], float]:
    """``clients`` clients for ``duration_s``; the requests, and when they began (perf_counter)."""
    started = time.perf_counter()
    until = started + duration_s
    requests: list[dict[str, Any]] = []

    async def client() -> None:
        async with client_session(timeout_s=900) as session:
            while time.perf_counter() < until:
                record = await _ask(session, url, body, served_by, started)
                requests.append(record)
                if not record["ok"]:
                    await asyncio.sleep(ERROR_PAUSE_S)

    await asyncio.gather(*(client() for _ in range(clients)))
    return sorted(requests, key=lambda r: r["t_s"]), started


def _ms(values: list[float], q: float) -> float | None:
    return round(percentile(sorted(values), q), 1) if values else None


def summarize(target: str, requests: list[dict[str, Any]], replicas: list[list[float]]) -> dict[str, Any]:
    """A target's row: cold start = requests started before the first cluster-served answer arrived."""
    ok = [r for r in requests if r["ok"]]
    cluster = [r for r in ok if r["upstream"] == "cluster"]
    first = min((r["t_s"] + r["ttft_ms"] / 1000 for r in cluster), default=None)
    ready = next((t for t, running, *_ in replicas if running >= 1), None)
    woke = next((t for t, running, starting, target in replicas if max(running, starting, target) >= 1), None)
    cold = [r["ttft_ms"] for r in ok if first is None or r["t_s"] < first]
    after = [r["ttft_ms"] for r in ok if first is not None and r["t_s"] >= first]
    back = min((r["t_s"] for r in cluster if ready is not None and r["t_s"] >= ready), default=None)
    return {
        "target": target, "requests": len(requests), "cluster": len(cluster),
        "waited": sum(r["tried_cluster"] for r in requests if ready is None or r["t_s"] < ready),
        "cold_ttft_p50_ms": _ms(cold, 0.5), "cold_ttft_p99_ms": _ms(cold, 0.99),
        "after_ttft_p50_ms": _ms(after, 0.5), "woke_s": woke, "ready_s": ready,
        "first_cluster_s": round(first, 2) if first is not None else None,
        "back_after_ready_s": round(back - ready, 2) if back is not None and ready is not None else None,
        "errors": len(requests) - len(ok), "requests_log": requests, "replicas": replicas,
    }


def checks(rows: list[dict[str, Any]], provider: dict[str, Any], probe_interval_s: float) -> list[str]:
    """The issue's two targets for ``router-capacity``, as figures."""
    row = next((r for r in rows if r["target"] == "router-capacity"), None)
    if row is None:
        return []
    lines = []
    own, p99 = provider["ttft_p99_ms"], row["cold_ttft_p99_ms"]
    if own and p99 is not None:
        lines.append(f"router-capacity: cold-start TTFT p99 {p99:.0f} ms = {p99 / own:.2f}x the provider's own "
                     f"p99 ({own:.0f} ms; target <= 2x: {'met' if p99 <= 2 * own else 'NOT met'}); "
                     f"{row['waited']} requests tried the cluster before its replica ran (target 0)")
    back, limit = row["back_after_ready_s"], probe_interval_s + 1
    if back is not None:
        lines.append(f"router-capacity: the first request the cluster served started {back:.1f} s after the "
                     f"capacity route showed its replica running (target <= probe_interval_s + 1 = {limit:.0f} s: "
                     f"{'met' if back <= limit else 'NOT met'})")
    else:
        lines.append("router-capacity: the cluster served no request after its replica was ready")
    return lines


def _router_config(config: dict[str, Any], target: str, probe_interval_s: float) -> dict[str, Any]:
    cluster = dict(config["cluster"])
    if target == "router-no-capacity":
        cluster["capacity"] = {"enabled": False}
    return {**config, "router": {**config["router"], "probe_interval_s": probe_interval_s}, "cluster": cluster}


def _target(target: str, config: dict[str, Any], direct_url: str, capacity: tuple[str, str], body: bytes,
            args: argparse.Namespace, tmp: Path, log: IO[bytes]) -> dict[str, Any]:
    print(f"{target}: waiting for zero replicas", flush=True)
    waited = _wait_for_zero(*capacity)
    print(f"{target}: at zero after {waited:.0f} s; {args.clients} clients for {args.duration_s:.0f} s", flush=True)
    watch = Watch(*capacity)
    watch.start()
    try:
        if target == "serve":
            requests, started = asyncio.run(_load(f"{direct_url}/chat/completions", body, args.clients,
                                                  args.duration_s, "cluster"))
        else:
            port = free_port()
            with openweight(_router_config(config, target, args.probe_interval_s), port, tmp, log):
                requests, started = asyncio.run(_load(f"http://127.0.0.1:{port}/v1/chat/completions", body,
                                                      args.clients, args.duration_s, None))
    finally:
        watch.stopped.set()
        watch.join()
    replicas = watch.since(started)
    row = summarize(target, requests, replicas)
    print(report.table([row], COLUMNS), flush=True)
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The provider alone, then each target from zero replicas; prints, writes JSON and the chart."""
    settings = {k: getattr(args, k) for k in ("duration_s", "clients", "max_tokens", "provider_ttft_s",
                                               "provider_chunk_delay_s", "downscale_delay_s", "probe_interval_s")}
    result = report.new_report("coldstart", settings)
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Tell me about the sea."}],
                       "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}).encode()
    zero = {"min": 0, "max": 1, "downscale_delay_s": args.downscale_delay_s}
    with workspace() as (tmp, log):
        fallback = free_port()
        config = stack_config(fallback_url=f"http://127.0.0.1:{fallback}/v1", serve={"replicas": zero})
        del config["cluster"]["first_byte_timeout_s"]  # the router's default: "today's behaviour"
        result["settings"]["config"] = config
        path = write_config(config, tmp)
        with fake_upstream(fallback, log, chunks=args.max_tokens, chunk_delay_s=args.provider_chunk_delay_s,
                           delay_before_headers_s=args.provider_ttft_s), local_stack(path, log) as stack:
            own, _ = asyncio.run(_load(f"http://127.0.0.1:{fallback}/v1/chat/completions", body, args.clients,
                                       PROVIDER_S, "provider"))
            ttfts = [r["ttft_ms"] for r in own if r["ok"]]
            result["provider"] = {"requests": len(own), "ttft_p50_ms": _ms(ttfts, 0.5),
                                  "ttft_p99_ms": _ms(ttfts, 0.99)}
            print(f"provider's own TTFT: p50 {result['provider']['ttft_p50_ms']} ms, "
                  f"p99 {result['provider']['ttft_p99_ms']} ms", flush=True)
            cluster = stack.settings.cluster
            capacity = (cluster.url.removesuffix("/v1") + cluster.capacity.path, stack.settings.cluster_model_id(MODEL))
            direct_url = stack.settings.cluster_base_url(capacity[1])
            for target in args.targets:
                result["rows"].append(_target(target, config, direct_url, capacity, body, args, tmp, log))
    result["checks"] = checks(result["rows"], result["provider"], args.probe_interval_s)
    result["failed"] = any(r["errors"] for r in result["rows"] if r["target"] == "router-capacity")
    text = report.table(result["rows"], COLUMNS) + "\n\n" + "\n".join(result["checks"])
    text += "\n\n" + NOTES
    report.finish(result, text, args.out, chart if args.chart else None)
    return result


def chart(result: dict[str, Any]) -> Any:
    fig, (ax,) = report.figure(1, f"openweight bench coldstart - {MODEL} on CPU from zero replicas "
                                  f"({result['date'][:10]}, {result['settings']['clients']} clients)",
                               width=9.0, height=4.6)
    colors = {"serve": "tab:orange", "router-no-capacity": "tab:purple", "router-capacity": "tab:blue"}
    for row in result["rows"]:
        done = [r for r in row["requests_log"] if r["ttft_ms"] is not None]
        color = colors.get(row["target"], "tab:gray")
        ax.plot([r["t_s"] for r in done], [r["ttft_ms"] for r in done], ".", color=color, markersize=4,
                label=row["target"])
        if row["ready_s"] is not None:
            ax.axvline(row["ready_s"], color=color, linestyle=":", linewidth=1)
    own = result.get("provider", {}).get("ttft_p99_ms")
    if own:
        ax.axhline(own, color="tab:gray", linestyle="--", linewidth=1, label=f"provider's own p99 ({own:.0f} ms)")
    report.log_axis(ax, "y")
    ax.set_xlabel("request start, s from the start of the load (dotted: replica ready)")
    ax.set_ylabel("TTFT, ms")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return fig
