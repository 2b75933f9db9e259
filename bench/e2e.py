"""`openweight bench e2e`: the real local stack on CPU against vLLM's own OpenAI server.

The same streaming load (``--concurrency`` clients, ``--requests`` chat requests each round, every
answer exactly ``--max-tokens`` tokens: ``ignore_eos``, temperature 0) goes to:

- ``vllm``: ``python -m vllm.entrypoints.openai.api_server`` with the model folder, engine arguments
  and environment the Serve replica gets;
- ``serve``: the Ray Serve OpenAI ingress of the local stack (``cluster.stack.LocalStack``), which
  answers HTTP itself (Serve's direct ingress);
- ``proxy``: the same ingress behind Serve's proxy process, as on Kubernetes (shown when the stack
  runs direct ingress);
- ``router``: openweight in front of that same stack (router -> Ray Serve -> vLLM).

All are up at once (an idle engine costs no CPU) and take turns in each round, each round
starting with the next one, so that they share the machine's conditions. Reported per run: output tokens/s (from each
answer's ``usage``), time to first token, request latency, errors, the router's CPU per request,
and where each target's CPU went per output token: its *serving* processes (every process a token
crosses between the engine and the client: vLLM's API server; Serve's LLM replica and ingress
replica, plus its proxy or the router) and its engine (vLLM's engine core and model runner); then
the ratio of each stack path to vLLM's own server. Engine start-up takes minutes on CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
from typing import Any

import yaml

from bench import report
from bench.harness import percentile, run_load, workspace
from bench.report import Column
from bench.servers import openweight
from bench.stack import (
    MODEL,
    engine_processes,
    local_stack,
    serve_processes,
    stack_config,
    vllm_server,
    write_config,
)

PROMPT = "Write a short story about a robot who learns to paint."

COLUMNS = [
    Column("target", "target", 7), Column("round", "round", 5), Column("requests", "requests", 8),
    Column("tokens", "tokens", 7), Column("tokens_per_s", "tok/s", 8, 1), Column("ttft_p50_ms", "TTFT p50", 9, 0),
    Column("ttft_p99_ms", "TTFT p99", 9, 0), Column("latency_p50_s", "lat p50 s", 9), Column("errors", "errors", 6),
    Column("router_cpu_ms_per_request", "router ms/req", 13, 2),
    Column("serving_cpu_ms_per_token", "serving ms/tok", 14, 2),
    Column("engine_cpu_ms_per_token", "engine ms/tok", 13, 1),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent streaming clients")
    parser.add_argument("--requests", type=int, default=32, help="requests per target and round")
    parser.add_argument("--max-tokens", type=int, default=64, help="output tokens per answer")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (the targets take turns in each)")
    parser.add_argument("--engine-arg", dest="engine_args", type=engine_arg, action="append", default=[],
                        metavar="KEY=VALUE", help="a vLLM engine argument for both engines, vLLM's own server and the "
                        "stack's replica (repeatable; the value is read as YAML), e.g. stream_interval=4")


def engine_arg(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` from the command line: (key, the value read as YAML)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise argparse.ArgumentTypeError(f"{key}: the value is not valid YAML ({exc})") from None


def request_body(max_tokens: int) -> bytes:
    return json.dumps({
        "model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens,
        "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
    }).encode()


def processes(vllm_pid: int, router_pid: int) -> dict[str, tuple[list[int], list[int]]]:
    """Per target: (its serving processes, its engine processes), looked up now (replicas may restart)."""
    vllm_engine = engine_processes(vllm_pid)
    stack_engine = [pid for pid in engine_processes() if pid not in vllm_engine]
    serve = serve_processes()
    replicas = serve["llm_server"] + serve["ingress"]
    return {
        "vllm": ([vllm_pid], vllm_engine),
        "serve": (replicas, stack_engine),
        "proxy": (serve["proxy"] + replicas, stack_engine),
        "router": ([router_pid, *replicas], stack_engine),
    }


def _measure(target: str, round_: int, url: str, args: argparse.Namespace, serving: list[int], engine: list[int],
             router_pid: int | None) -> dict[str, Any]:
    watch = {f"serving {pid}": pid for pid in serving} | {f"engine {pid}": pid for pid in engine}
    if router_pid:
        watch["router"] = router_pid
    load = asyncio.run(run_load(f"{url}/chat/completions", request_body(args.max_tokens), concurrency=args.concurrency,
                                requests=args.requests, watch=watch, tree=False, warmup=1, timeout_s=600))
    ok = [r for r in load.results if r.ok]
    ttfts = sorted(r.ttft_s or 0.0 for r in ok)
    tokens = sum(r.completion_tokens or 0 for r in ok)
    row: dict[str, Any] = {
        "target": target, "round": round_, "requests": len(load.results), "errors": len(load.results) - len(ok),
        "seconds": round(load.seconds, 2), "tokens": tokens, "tokens_per_s": round(tokens / load.seconds, 1),
        "ttft_p50_ms": round(percentile(ttfts, 0.5) * 1000, 1), "ttft_p99_ms": round(percentile(ttfts, 0.99) * 1000, 1),
        "latency_p50_s": round(percentile(sorted(r.seconds for r in ok), 0.5), 2),
    }
    if router_pid:
        row["router_cpu_ms_per_request"] = round(load.cpu_s["router"] * 1000 / args.requests, 2)
    if tokens:
        for kind in ("serving", "engine"):
            cpu_s = sum(seconds for name, seconds in load.cpu_s.items() if name.startswith(kind + " "))
            row[f"{kind}_cpu_ms_per_token"] = round(cpu_s * 1000 / tokens, 3)
    print(report.table([row], COLUMNS), flush=True)
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    """vLLM's own server, the stack and the router, in turns; prints, writes JSON and the chart."""
    engine_args = dict(args.engine_args)
    settings = {"concurrency": args.concurrency, "requests": args.requests, "max_tokens": args.max_tokens,
                "rounds": args.rounds, "prompt": PROMPT, "model": MODEL, "engine_args": engine_args}
    result = report.new_report("e2e", settings)
    with workspace() as (tmp, log):
        config = stack_config(serve={"engine_args": engine_args} if engine_args else None)
        path = write_config(config, tmp)
        # Both engines run at once (an idle one costs no CPU) so that each round measures every target
        # back to back, under the same conditions on a shared machine.
        with vllm_server(path, log) as (vllm_url, vllm_pid), local_stack(path, log, direct_ingress=True) as stack, \
                openweight(config, config["router"]["port"], tmp, log) as router:
            router_url = f"http://127.0.0.1:{config['router']['port']}/v1"
            targets = [("vllm", vllm_url), ("router", router_url), ("serve", config["cluster"]["url"])]
            if stack.proxy_url != config["cluster"]["url"]:
                targets.append(("proxy", stack.proxy_url))
            for round_ in range(1, args.rounds + 1):
                shift = (round_ - 1) % len(targets)
                for target, url in targets[shift:] + targets[:shift]:
                    serving, engine = processes(vllm_pid, router.pid)[target]
                    result["rows"].append(_measure(target, round_, url, args, serving, engine,
                                                   router.pid if target == "router" else None))
    result["summary"] = summary(result["rows"])
    result["failed"] = any(row["errors"] for row in result["rows"])
    text = report.table(result["rows"], COLUMNS) + "\n\n" + "\n".join(result["summary"])
    report.finish(result, text, args.out, chart if args.chart else None)
    return result


def _mean(rows: list[dict[str, Any]], target: str, key: str) -> float | None:
    values = [r[key] for r in rows if r["target"] == target and r.get(key) is not None]
    return statistics.fmean(values) if values else None


def summary(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    base_tps, base_ttft = _mean(rows, "vllm", "tokens_per_s"), _mean(rows, "vllm", "ttft_p50_ms")
    for target in ("serve", "proxy", "router"):
        tps, ttft = _mean(rows, target, "tokens_per_s"), _mean(rows, target, "ttft_p50_ms")
        if tps is None or not base_tps:
            continue
        line = f"{target}: {tps:.1f} tok/s = {tps / base_tps:.1%} of vLLM's own server ({base_tps:.1f} tok/s)"
        if ttft is not None and base_ttft:
            line += f"; TTFT p50 {ttft:.0f} ms vs {base_ttft:.0f} ms"
        lines.append(line)
    for target in ("vllm", "serve", "proxy", "router"):
        serving = _mean(rows, target, "serving_cpu_ms_per_token")
        engine = _mean(rows, target, "engine_cpu_ms_per_token")
        if serving is not None and engine is not None:
            lines.append(f"{target}: CPU per output token: serving processes {serving:.2f} ms, engine {engine:.1f} ms")
    return lines


def chart(result: dict[str, Any]) -> Any:
    rows = result["rows"]
    engine = "".join(f", {k}={v}" for k, v in result["settings"].get("engine_args", {}).items())
    fig, axes = report.figure(3, f"openweight bench e2e - {MODEL} on CPU ({result['date'][:10]}, "
                                 f"concurrency {result['settings']['concurrency']}{engine})", width=4.6)
    targets = [t for t in ("vllm", "serve", "proxy", "router") if any(r["target"] == t for r in rows)]
    names = {"vllm": "vLLM server", "serve": "Ray Serve", "proxy": "Serve\nvia proxy", "router": "router\n-> Serve"}
    palette = {"vllm": "tab:gray", "serve": "tab:orange", "proxy": "tab:brown", "router": "tab:blue"}
    labels, colors = [names[t] for t in targets], [palette[t] for t in targets]
    panels = (("tokens_per_s", "output tokens/s", "%.0f"), ("ttft_p50_ms", "TTFT p50, ms", "%.0f"),
              ("serving_cpu_ms_per_token", "CPU ms per token outside the engine", "%.2f"))
    for ax, (key, title, fmt) in zip(axes, panels, strict=True):
        means = [_mean(rows, t, key) or 0.0 for t in targets]
        bars = ax.bar(labels, means, color=colors)
        ax.bar_label(bars, fmt=fmt, fontsize=8)
        for i, target in enumerate(targets):
            points = [r[key] for r in rows if r["target"] == target]
            ax.plot([i] * len(points), points, "k.", markersize=4)
        ax.set_title(title + " (bars: mean; dots: rounds)", fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
    return fig
