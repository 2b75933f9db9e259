"""`openweight bench e2e`: the real local stack on CPU against vLLM's own OpenAI server.

The load is vLLM's own benchmark client (``vllm.benchmarks.serve``, :mod:`bench.vllm_client`):
random prompts of ``--input-len`` tokens, exactly ``--max-tokens`` output tokens each
(``ignore_eos``), ``--requests`` prompts per target and round at ``--concurrency``, streamed from
``/v1/completions``. It goes to:

- ``vllm``: ``python -m vllm.entrypoints.openai.api_server`` with the model folder, engine arguments
  and environment the Serve replica gets;
- ``direct``: the local stack on the direct data path (``cluster.stack.LocalStack``, in this
  process): Serve's HAProxy -> the model's replica, serving vLLM's own app (direct streaming);
- ``classic``: the same stack on the classic data path (``openweight cluster up``, a process of its
  own): Serve's proxy -> the OpenAI ingress replica -> the LLM replica;
- ``router-direct`` / ``router-classic``: openweight in front of each.

All are up at once (an idle engine costs no CPU) and take turns in each round, each round
starting with the next one, so that they share the machine's conditions. Reported per run: output
tokens/s and time to first token (vLLM's client's figures), failed requests, the router's CPU per
request, and where each target's CPU went per output token: its *serving* processes (every
process a token crosses between the engine and the client: vLLM's API server; Serve's replicas,
HAProxy or Serve's proxy, and the router) and its engine (vLLM's engine core and model runner);
then the ratio of each path to vLLM's own server. Engine start-up takes minutes on CPU; the three
engines and two Rays need about 17 GB of memory.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
from typing import Any

import yaml

from bench import report
from bench.harness import cpu_seconds, workspace
from bench.report import Column
from bench.servers import openweight
from bench.stack import (
    MODEL,
    classic_stack,
    engine_processes,
    engine_setup,
    local_stack,
    serve_processes,
    stack_config,
    vllm_server,
    write_config,
)
from bench.vllm_client import run_client
from router.net import free_port

TARGETS = ("vllm", "direct", "router-direct", "classic", "router-classic")

COLUMNS = [
    Column("target", "target", 14), Column("round", "round", 5), Column("requests", "requests", 8),
    Column("tokens", "tokens", 7), Column("tokens_per_s", "tok/s", 8, 1), Column("ttft_p50_ms", "TTFT p50", 9, 0),
    Column("ttft_p99_ms", "TTFT p99", 9, 0), Column("tpot_p50_ms", "TPOT p50", 9, 1), Column("errors", "errors", 6),
    Column("router_cpu_ms_per_request", "router ms/req", 13, 2),
    Column("serving_cpu_ms_per_token", "serving ms/tok", 14, 2),
    Column("engine_cpu_ms_per_token", "engine ms/tok", 13, 1),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent streaming clients")
    parser.add_argument("--requests", type=int, default=32, help="prompts per target and round")
    parser.add_argument("--input-len", type=int, default=64, help="prompt tokens per request (random)")
    parser.add_argument("--max-tokens", type=int, default=64, help="output tokens per answer")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (the targets take turns in each)")
    parser.add_argument("--no-classic", dest="classic", action="store_false",
                        help="leave out the classic data path (its Ray and engine need about 6.5 GB)")
    parser.add_argument("--engine-arg", dest="engine_args", type=engine_arg, action="append", default=[],
                        metavar="KEY=VALUE", help="a vLLM engine argument for every engine, vLLM's own server and the "
                        "stacks' replicas (repeatable; the value is read as YAML), e.g. stream_interval=4")


def engine_arg(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` from the command line: (key, the value read as YAML)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise argparse.ArgumentTypeError(f"{key}: the value is not valid YAML ({exc})") from None


Processes = dict[str, tuple[list[int], list[int]]]


def processes(vllm_pid: int, classic_pid: int | None, routers: dict[str, int]) -> Processes:
    """Per target: (its serving processes, its engine processes), looked up now (replicas may restart)."""
    vllm_engine = engine_processes(vllm_pid)
    classic_engine = engine_processes(classic_pid) if classic_pid else []
    direct_engine = [pid for pid in engine_processes() if pid not in vllm_engine + classic_engine]
    classic = serve_processes(classic_pid) if classic_pid else {}
    ours = serve_processes()
    direct = [pid for role in ("llm_server", "llm_router", "haproxy") for pid in ours[role]
              if pid not in classic.get(role, [])]
    classic_serving = [pid for role in ("llm_server", "ingress", "proxy") for pid in classic.get(role, [])]
    return {
        "vllm": ([vllm_pid], vllm_engine),
        "direct": (direct, direct_engine),
        "router-direct": ([routers["router-direct"], *direct], direct_engine),
        "classic": (classic_serving, classic_engine),
        "router-classic": ([routers.get("router-classic", 0), *classic_serving], classic_engine),
    }


def _measure(target: str, round_: int, url: str, args: argparse.Namespace, tokenizer: str, serving: list[int],
             engine: list[int], router_pid: int | None, log: Any) -> dict[str, Any]:
    watch = {"serving": [p for p in serving if p], "engine": engine, "router": [router_pid] if router_pid else []}
    before = {kind: sum(cpu_seconds(pid) for pid in pids) for kind, pids in watch.items()}
    result = run_client(url.removesuffix("/v1"), MODEL, tokenizer, log, input_len=args.input_len,
                        output_len=args.max_tokens, prompts=args.requests, concurrency=args.concurrency)
    used = {kind: sum(cpu_seconds(pid) for pid in pids) - before[kind] for kind, pids in watch.items()}
    tokens = int(result["total_output_tokens"])
    row: dict[str, Any] = {
        "target": target, "round": round_, "requests": args.requests, "errors": int(result["failed"]),
        "seconds": round(result["duration"], 2), "tokens": tokens,
        "tokens_per_s": round(result["output_throughput"], 1),
        "ttft_p50_ms": round(result["median_ttft_ms"], 1), "ttft_p99_ms": round(result["p99_ttft_ms"], 1),
        "tpot_p50_ms": round(result["median_tpot_ms"], 1),
    }
    if router_pid:
        row["router_cpu_ms_per_request"] = round(used["router"] * 1000 / args.requests, 2)
    if tokens:
        row["serving_cpu_ms_per_token"] = round((used["serving"] + used["router"]) * 1000 / tokens, 3)
        row["engine_cpu_ms_per_token"] = round(used["engine"] * 1000 / tokens, 3)
    print(report.table([row], COLUMNS), flush=True)
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    """vLLM's own server, both data paths and the router in front of each, in turns; prints, writes
    JSON and the chart."""
    engine_args = dict(args.engine_args)
    settings = {"concurrency": args.concurrency, "requests": args.requests, "input_len": args.input_len,
                "max_tokens": args.max_tokens, "rounds": args.rounds, "model": MODEL, "engine_args": engine_args,
                "client": "vllm.benchmarks.serve (random dataset, /v1/completions, ignore_eos)"}
    result = report.new_report("e2e", settings)
    with workspace() as (tmp, log), contextlib.ExitStack() as running:
        config = stack_config(serve={"engine_args": engine_args} if engine_args else None)
        path = write_config(config, tmp)
        tokenizer = engine_setup(path)[1]
        # Every engine runs at once (an idle one costs no CPU) so that each round measures every target
        # back to back, under the same conditions on a shared machine.
        vllm_url, vllm_pid = running.enter_context(vllm_server(path, log))
        classic_pid = running.enter_context(classic_stack(config, tmp, log)) if args.classic else None
        running.enter_context(local_stack(path, log))
        routers = {"router-direct": running.enter_context(openweight(config, config["router"]["port"], tmp, log)).pid}
        targets = [("vllm", vllm_url), ("direct", _direct_base(path)),
                   ("router-direct", f"http://127.0.0.1:{config['router']['port']}/v1")]
        if classic_pid:
            classic = yaml.safe_load((tmp / "classic.yaml").read_text())
            port = free_port()
            router = running.enter_context(openweight(classic, port, tmp, log))
            routers["router-classic"] = router.pid
            targets += [("classic", classic["cluster"]["url"]), ("router-classic", f"http://127.0.0.1:{port}/v1")]
        for round_ in range(1, args.rounds + 1):
            shift = (round_ - 1) % len(targets)
            for target, url in targets[shift:] + targets[:shift]:
                serving, engine = processes(vllm_pid, classic_pid, routers)[target]
                router_pid = routers.get(target)
                result["rows"].append(_measure(target, round_, url, args, tokenizer, serving, engine, router_pid, log))
    result["summary"] = summary(result["rows"])
    result["failed"] = any(row["errors"] for row in result["rows"])
    text = report.table(result["rows"], COLUMNS) + "\n\n" + "\n".join(result["summary"])
    report.finish(result, text, args.out, chart if args.chart else None)
    return result


def _direct_base(path: Any) -> str:
    from router.config_file import load_settings

    return load_settings(path).cluster_base_url(MODEL)


def _mean(rows: list[dict[str, Any]], target: str, key: str) -> float | None:
    values = [r[key] for r in rows if r["target"] == target and r.get(key) is not None]
    return statistics.fmean(values) if values else None


def summary(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    base_tps, base_ttft = _mean(rows, "vllm", "tokens_per_s"), _mean(rows, "vllm", "ttft_p50_ms")
    for target in TARGETS[1:]:
        tps, ttft = _mean(rows, target, "tokens_per_s"), _mean(rows, target, "ttft_p50_ms")
        if tps is None or not base_tps:
            continue
        line = f"{target}: {tps:.1f} tok/s = {tps / base_tps:.1%} of vLLM's own server ({base_tps:.1f} tok/s)"
        if ttft is not None and base_ttft:
            line += f"; TTFT p50 {ttft:.0f} ms vs {base_ttft:.0f} ms ({ttft - base_ttft:+.0f} ms)"
        lines.append(line)
    for target in TARGETS:
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
    targets = [t for t in TARGETS if any(r["target"] == t for r in rows)]
    names = {"vllm": "vLLM server", "direct": "Serve\ndirect", "router-direct": "router\n-> direct",
             "classic": "Serve\nclassic", "router-classic": "router\n-> classic"}
    palette = {"vllm": "tab:gray", "direct": "tab:orange", "router-direct": "tab:blue", "classic": "tab:brown",
               "router-classic": "tab:purple"}
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
