"""`openweight bench soak`: steady streaming load while the vLLM replica's engine is killed.

The local stack (``cluster.stack.LocalStack``: a private Ray, the Serve app, one vLLM CPU replica)
serves the built-in model behind openweight, with a fake provider as its fallback (answers as long
as the cluster's, ``--fallback-chunk-delay`` between tokens). ``--concurrency`` clients stream
chat answers for ``--duration`` seconds; at ``--kill-at`` the replica's vLLM engine process
(``VLLM::EngineCore`` and its ``VLLM::Worker``) get SIGKILL and Serve replaces the
replica. Every request is counted once:

- ``cluster`` / ``fallback``: complete (``[DONE]``, no error event), by the upstream that served;
- ``broken``: the stream had started and broke: it ends with an in-band error event and ``[DONE]``
  (a stream that broke and was continued on the fallback counts as ``cluster``: its client saw one
  stream; the router's ``openweight_stream_resumes_total`` and its resume gap are reported apart);
- ``cut``: ended without ``[DONE]`` and without an error event (must be 0);
- ``failed``: no 200 answer (must be 0: before the first byte the router falls back).

The router's resident memory is sampled every ``--sample-interval`` seconds: start, end and maximum.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import time
from typing import Any

import httpx

from bench import report
from bench.harness import BenchError, Result, rss_bytes, run_load, workspace
from bench.report import Column
from bench.servers import fake_upstream, openweight
from bench.stack import MODEL, engine_processes, kill_engine, local_stack, stack_config, write_config
from router.net import free_port

OUTCOMES = ("cluster", "fallback", "broken", "cut", "failed")

COLUMNS = [
    Column("requests", "requests", 8), *(Column(o, o, 8) for o in OUTCOMES),
    Column("killed_at_s", "kill s", 6, 0), Column("engine_back_s", "engine back s", 13, 0),
    Column("cluster_back_s", "cluster back s", 14, 0), Column("rss_start_mib", "RSS start", 9, 1),
    Column("rss_end_mib", "RSS end", 7, 1), Column("rss_max_mib", "RSS max", 7, 1),
    Column("resumed", "resumed", 7), Column("resume_gap_p50_s", "gap p50 s", 9, 2),
    Column("resume_gap_p99_s", "gap p99 s", 9, 2),
]


def _samples(exposition: str, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
    found = []
    for line in exposition.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        series, _, value = line.rpartition(" ")
        _, _, rest = series.partition("{")
        pairs = dict(pair.split("=", 1) for pair in rest.rstrip("}").split(",") if pair)
        pairs = {k: v.strip('"') for k, v in pairs.items()}
        if all(pairs.get(k) == v for k, v in labels.items()):
            found.append((pairs, float(value)))
    return found


def metric_sum(exposition: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples on a /metrics page that match `labels`."""
    return sum(value for _, value in _samples(exposition, name, **labels))


def histogram_quantile(exposition: str, name: str, q: float) -> float | None:
    """Prometheus's `histogram_quantile` over every series of a histogram (linear within a bucket)."""
    buckets: dict[float, float] = collections.defaultdict(float)
    for pairs, value in _samples(exposition, name + "_bucket"):
        buckets[float(pairs["le"])] += value
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] == 0:
        return None
    rank, lower, below = q * buckets[bounds[-1]], 0.0, 0.0
    for bound in bounds:
        if buckets[bound] >= rank:
            if bound == float("inf"):
                return lower
            return round(lower + (bound - lower) * (rank - below) / max(buckets[bound] - below, 1e-9), 3)
        lower, below = bound, buckets[bound]
    return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of load")
    parser.add_argument("--kill-at", type=float, default=60.0, help="seconds into the load when the engine is killed")
    parser.add_argument("--concurrency", type=int, default=4, help="concurrent streaming clients")
    parser.add_argument("--max-tokens", type=int, default=48, help="tokens per answer")
    parser.add_argument("--fallback-chunk-delay", type=float, default=0.02,
                        help="the fake provider's seconds per token")
    parser.add_argument("--first-byte-timeout", type=float, default=10.0,
                        help="the router's first-byte timeout towards the cluster, seconds")
    parser.add_argument("--sample-interval", type=float, default=1.0, help="seconds between RSS samples")


def outcome(result: Result) -> str:
    if result.status != 200 or (result.error is not None and result.events == 0):
        return "failed"
    if result.error_event:
        return "broken"
    if not result.done:
        return "cut"
    return "fallback" if result.headers.get("x-openweight-upstream") != "cluster" else "cluster"


async def _soak(url: str, body: bytes, router_pid: int, args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    events: dict[str, Any] = {"rss": [], "killed": [], "killed_at_s": None, "engine_back_s": None}

    async def sample() -> None:
        while True:
            events["rss"].append((round(time.perf_counter() - started, 1), rss_bytes(router_pid)))
            await asyncio.sleep(args.sample_interval)

    async def kill() -> None:
        await asyncio.sleep(args.kill_at)
        events["killed"] = kill_engine()
        events["killed_at_s"] = round(time.perf_counter() - started, 1)
        while not engine_processes():  # noqa: ASYNC110 (a new process is no event to wait on: poll /proc)
            await asyncio.sleep(0.5)
        events["engine_back_s"] = round(time.perf_counter() - started, 1)

    tasks = [asyncio.create_task(sample()), asyncio.create_task(kill())]
    try:
        load = await run_load(url, body, concurrency=args.concurrency, duration_s=args.duration, warmup=1,
                              tree=False, timeout_s=600, keep_headers=("x-openweight-upstream",))
    finally:
        for task in tasks:
            task.cancel()
    events["results"] = [(round(r.started_at - started, 2), round(r.started_at + r.seconds - started, 2), outcome(r))
                         for r in load.results]
    events["rss"].append((round(time.perf_counter() - started, 1), rss_bytes(router_pid)))
    return events


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start the stack, soak it, kill the engine; prints, writes JSON and the chart."""
    settings = {k: getattr(args, k) for k in ("duration", "kill_at", "concurrency", "max_tokens",
                                               "fallback_chunk_delay", "first_byte_timeout")}
    result = report.new_report("soak", settings)
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Tell me about the sea."}],
                       "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}).encode()
    with workspace() as (tmp, log):
        fallback = free_port()
        config = stack_config(fallback_url=f"http://127.0.0.1:{fallback}/v1",
                              cluster={"first_byte_timeout_s": args.first_byte_timeout})
        result["settings"]["config"] = config
        path = write_config(config, tmp)
        with fake_upstream(fallback, log, chunks=args.max_tokens, chunk_delay_s=args.fallback_chunk_delay), \
                local_stack(path, log), openweight(config, config["router"]["port"], tmp, log) as router:
            if not engine_processes():
                raise BenchError("no vLLM engine process (VLLM::EngineCore) found below this process")
            url = f"http://127.0.0.1:{config['router']['port']}/v1/chat/completions"
            events = asyncio.run(_soak(url, body, router.pid, args))
            exposition = httpx.get(f"http://127.0.0.1:{config['router']['port']}/metrics").text
    counts = collections.Counter(o for _, _, o in events["results"])
    rss = [mib for _, mib in events["rss"]]
    kill_at = events["killed_at_s"]
    back = [end for start, end, o in events["results"] if o == "cluster" and kill_at is not None and start > kill_at]
    row: dict[str, Any] = {
        "requests": len(events["results"]), **{o: counts.get(o, 0) for o in OUTCOMES},
        "killed_at_s": kill_at, "killed_pids": events["killed"], "engine_back_s": events["engine_back_s"],
        "cluster_back_s": min(back) if back else None,
        "rss_start_mib": round(rss[0] / 2**20, 1), "rss_end_mib": round(rss[-1] / 2**20, 1),
        "rss_max_mib": round(max(rss) / 2**20, 1),
        "resumed": int(metric_sum(exposition, "openweight_stream_resumes_total", outcome="success")),
        "resume_gap_p50_s": histogram_quantile(exposition, "openweight_stream_resume_gap_seconds", 0.5),
        "resume_gap_p99_s": histogram_quantile(exposition, "openweight_stream_resume_gap_seconds", 0.99),
    }
    result["rows"] = [row]
    result["timeline"] = events["results"]
    result["rss"] = events["rss"]
    result["failed"] = bool(row["failed"] or row["cut"])
    text = report.table([row], COLUMNS)
    text += (f"\n\nkill s: when the engine ({', '.join(map(str, events['killed'])) or 'none found'}) was killed; "
             "engine back s: when a new engine process existed;\ncluster back s: first answer completed by the "
             "cluster among requests started after the kill. Seconds from the start of the load.")
    report.finish(result, text, args.out, chart if args.chart else None)
    return result


def chart(result: dict[str, Any]) -> Any:
    row = result["rows"][0]
    fig, (done_ax, rss_ax) = report.figure(2, f"openweight bench soak - {MODEL}, vLLM engine killed at "
                                              f"{row['killed_at_s']} s ({result['date'][:10]})", width=5.0)
    width = 5.0
    end = max((e for _, e, _ in result["timeline"]), default=0.0)
    bins = [i * width for i in range(int(end // width) + 1)]
    bottom = [0] * len(bins)
    colors = {"cluster": "tab:blue", "fallback": "tab:green", "broken": "tab:orange", "cut": "tab:purple",
              "failed": "tab:red"}
    for name, color in colors.items():
        heights = [0] * len(bins)
        for _, finished, o in result["timeline"]:
            if o == name:
                heights[min(len(bins) - 1, int(finished // width))] += 1
        if any(heights):
            done_ax.bar(bins, heights, width=width, bottom=bottom, align="edge", color=color, label=name)
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    for key, style in (("killed_at_s", "r--"), ("engine_back_s", "k:")):
        if row.get(key) is not None:
            done_ax.axvline(row[key], color=style[0], linestyle=style[1:], linewidth=1)
    done_ax.set_title(f"requests completed per {width:.0f} s, by outcome (red: kill; dotted: engine back)", fontsize=9)
    done_ax.set_xlabel("seconds")
    done_ax.legend(fontsize=7)
    mib = [b / 2**20 for _, b in result["rss"]]
    rss_ax.plot([t for t, _ in result["rss"]], mib, color="tab:blue")
    rss_ax.set_title("router resident memory, MiB", fontsize=9)
    rss_ax.set_xlabel("seconds")
    rss_ax.set_ylim(0, max(mib, default=1.0) * 1.25)
    for ax in (done_ax, rss_ax):
        ax.grid(True, alpha=0.3)
    return fig

