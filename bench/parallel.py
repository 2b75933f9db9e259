"""Tokens/s and time to first token of the built-in model's engine, one shard vs TP=3 vs PP=2 (CPU).

Each layout runs in a fresh child process (``python -m bench.parallel --child TP PP``): vLLM
alone, with the engine arguments and environment a replica of that layout gets from the config
(``ServeSpec.engine_kwargs``/``engine_env``: fp32, eager or traced once for PP, the KV cache
size) and the OpenMP binding per rank of :func:`cluster.engine_hooks.omp_threads_bind`. It
measures the engine, not Serve or the router (``openweight bench e2e`` does those): TTFT is the
median latency of a one-token answer to one request; tok/s is ``--concurrency`` answers of
``--max-tokens`` tokens each (``ignore_eos``) generated at once.

On a 2-core machine sharding is expected to be slower: the ranks share the same two cores and
wait for each other at every layer (TP) or stage (PP).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

from bench import report

MODEL = "smollm2-135m-instruct"
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
LAYOUTS = {"tp1": (1, 1), "pp2": (1, 2), "tp3": (3, 1)}
COLUMNS = [
    report.Column("layout", "layout", 6),
    report.Column("bind", "omp bind", 10),
    report.Column("start_s", "start s", 8, 1),
    report.Column("ttft_s", "TTFT s", 8, 3),
    report.Column("tok_s", "tok/s", 8, 1),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layouts", default="tp1,pp2,tp3", help="comma-separated: tp1, pp2, tp3")
    parser.add_argument("--concurrency", type=int, default=8, help="answers generated at once for tok/s")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per answer for tok/s")
    parser.add_argument("--timeout", type=float, default=600, help="seconds each layout may take")


def run(args: argparse.Namespace) -> dict[str, Any]:
    layouts = [name.strip() for name in args.layouts.split(",") if name.strip()]
    unknown = [name for name in layouts if name not in LAYOUTS]
    if unknown:
        raise SystemExit(f"unknown layouts {unknown}: choose from {', '.join(LAYOUTS)}")
    settings = {"layouts": layouts, "concurrency": args.concurrency, "max_tokens": args.max_tokens, "model": MODEL}
    result = report.new_report("parallel", settings)
    for name in layouts:
        tp, pp = LAYOUTS[name]
        child = [sys.executable, "-m", "bench.parallel", "--child", str(tp), str(pp),
                 str(args.concurrency), str(args.max_tokens)]  # fmt: skip
        done = subprocess.run(child, capture_output=True, text=True, timeout=args.timeout)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        row: dict[str, Any] = {"layout": name, "tp": tp, "pp": pp}
        if done.returncode or not lines:
            row["error"] = (done.stderr or done.stdout)[-2000:]
        else:
            row.update(json.loads(lines[-1]))
        result["rows"].append(row)
    result["failed"] = any("error" in row for row in result["rows"])
    text = report.table(result["rows"], COLUMNS)
    for row in result["rows"]:
        if "error" in row:
            text += f"\n{row['layout']} failed:\n{row['error']}"
    report.finish(result, text, args.out, None)
    return result


def _child(tp: int, pp: int, concurrency: int, max_tokens: int) -> dict[str, Any]:
    """One layout, measured in this process (a fresh one: vLLM's settings are per process)."""
    import dataclasses

    from cluster.config import ServeSpec
    from cluster.engine_hooks import omp_threads_bind
    from cluster.model import prepare

    spec = ServeSpec(source=f"builtin:{MODEL}", accelerator="cpu", tensor_parallel_size=tp,
                     pipeline_parallel_size=pp)  # fmt: skip
    os.environ.update(spec.engine_env)
    cpus = sorted(os.sched_getaffinity(0))
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = omp_threads_bind(cpus, tp * pp)
    from vllm import LLM, SamplingParams
    from vllm.engine.arg_utils import EngineArgs

    names = {f.name for f in dataclasses.fields(EngineArgs)}
    kwargs = {k: v for k, v in spec.engine_kwargs.items() if k in names}
    started = time.monotonic()
    llm = LLM(model=str(prepare(MODEL)), **kwargs)
    start_s = time.monotonic() - started
    messages: list[Any] = [{"role": "user", "content": PROMPT}]
    first: list[float] = []
    for _ in range(3):
        t0 = time.monotonic()
        llm.chat(messages, SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
        first.append(time.monotonic() - t0)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    t0 = time.monotonic()
    outs = llm.chat([messages] * concurrency, params, use_tqdm=False)
    elapsed = time.monotonic() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"bind": os.environ["VLLM_CPU_OMP_THREADS_BIND"], "start_s": start_s,
            "ttft_s": statistics.median(first), "tok_s": tokens / elapsed, "tokens": tokens}  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--child":
        print(json.dumps(_child(*(int(a) for a in sys.argv[2:]))), flush=True)
