"""`openweight bench router`: what the router adds on top of its upstream.

The fake upstream (``python -m router.testing``) and the router run in processes of their own, on
free ports of 127.0.0.1; the load generator (httpx, a keep-alive client per concurrent worker) runs
here. Each scenario sends the same requests once straight to the fake and once through the router,
plain and streaming, at each concurrency, and reports throughput, full-response latency, the
latency the router adds, and the router's CPU time per request and per relayed chunk (from
``/proc/PID/stat``; its clock ticks are usually 10 ms, so use hundreds of requests).

The three processes share the machine's cores: on a small machine the load generator's own CPU
shapes the concurrent figures; ``--self-test`` (a second fake in place of the router) shows how far
the "added" columns move when nothing is added.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import math
import os
import platform
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import httpx
import yaml

MODEL = "bench-model"
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Scenario:
    """One measured run: ``requests`` requests to ``target`` at ``concurrency``."""

    target: str
    stream: bool
    concurrency: int
    requests: int
    errors: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_ms_per_request: float | None = None
    cpu_us_per_chunk: float | None = None
    added_p50_ms: float | None = None
    added_p99_ms: float | None = None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (fields 14 and 15 of /proc/PID/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # the name in parentheses may contain spaces
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def _percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    return sorted_values[max(0, min(len(sorted_values) - 1, math.ceil(q * len(sorted_values)) - 1))]


def _machine() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(),
            "system": f"{platform.system()} {platform.release()}"}


@contextlib.contextmanager
def _process(name: str, argv: list[str], ready_url: str, log: IO[bytes],
             env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``argv`` until the block ends (SIGTERM, then SIGKILL); wait until ``ready_url`` answers 200."""
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with status {process.returncode}: {shlex.join(argv)}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(ready_url, timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not become ready at {ready_url} within 60 s")
            time.sleep(0.1)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def _one(client: httpx.AsyncClient, url: str, body: bytes, stream: bool, chunks: int) -> float:
    """Send one request and read the whole answer; its latency in seconds (raise when it is wrong)."""
    started = time.perf_counter()
    async with client.stream("POST", url, content=body, headers={"content-type": "application/json"}) as answer:
        if answer.status_code != 200:
            raise RuntimeError(f"status {answer.status_code}")
        events, tail = 0, b""
        async for part in answer.aiter_bytes():
            events += part.count(b"data: ")
            tail = (tail + part)[-32:]
    if stream and (events != chunks + 2 or b"data: [DONE]" not in tail):
        raise RuntimeError(f"stream of {events} events, ending {tail!r}")
    return time.perf_counter() - started


async def _load(url: str, stream: bool, requests: int, concurrency: int, chunks: int,
                pid: int | None) -> tuple[list[float], int, float, float | None]:
    """Latencies, errors, wall seconds and CPU seconds of ``pid`` for ``requests`` requests.

    Each of the ``concurrency`` workers has a client (and keep-alive connection) of its own: one
    shared pool of 32 connections costs the client so much that it, not the server, sets the
    latency (encode/httpx#3215; against the fake on 2 cores: 170 req/s and p99 1.1 s, against
    590 req/s and p99 0.1 s with a client per worker).
    """
    request = {"model": MODEL, "messages": [{"role": "user", "content": "Say something."}],
               "max_tokens": chunks, "stream": stream}
    body = json.dumps(request).encode()
    latencies: list[float] = []
    errors = 0

    async def worker(client: httpx.AsyncClient, count: int, record: bool) -> None:
        nonlocal errors
        for _ in range(count):
            try:
                latency = await _one(client, url, body, stream, chunks)
            except (httpx.HTTPError, RuntimeError):
                errors += 1 if record else 0
                continue
            if record:
                latencies.append(latency)

    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(httpx.AsyncClient(timeout=120)) for _ in range(concurrency)]
        # Warm up: open every connection and let both servers settle.
        await asyncio.gather(*(worker(client, 2, record=False) for client in clients))
        shares = [requests // concurrency + (i < requests % concurrency) for i in range(concurrency)]
        cpu_before = _cpu_seconds(pid) if pid else 0.0
        started = time.perf_counter()
        await asyncio.gather(*(worker(client, n, record=True) for client, n in zip(clients, shares, strict=True)))
        seconds = time.perf_counter() - started
        cpu = _cpu_seconds(pid) - cpu_before if pid else None
    return latencies, errors, seconds, cpu


def _measure(target: str, base_url: str, stream: bool, concurrency: int, args: argparse.Namespace,
             pid: int | None) -> Scenario:
    latencies, errors, seconds, cpu = asyncio.run(
        _load(f"{base_url}/chat/completions", stream, args.requests, concurrency, args.chunks, pid)
    )
    latencies.sort()
    done = len(latencies)
    scenario = Scenario(target, stream, concurrency, args.requests, errors, round(seconds, 3),
                        round(done / seconds, 1),
                        round(_percentile(latencies, 0.5) * 1000, 3) if done else math.nan,
                        round(_percentile(latencies, 0.99) * 1000, 3) if done else math.nan)
    if cpu is not None:
        scenario.cpu_ms_per_request = round(cpu * 1000 / args.requests, 3)
        if stream:
            scenario.cpu_us_per_chunk = round(cpu * 1e6 / (args.requests * args.chunks), 2)
    return scenario


def _config_file(directory: Path, fake_url: str) -> Path:
    config = {"cluster": {"url": fake_url, "probe": False},
              "models": {MODEL: {"policy": "self_hosted_only"}}}
    path = directory / "bench-router.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _router_argv(config: Path, port: int, args: argparse.Namespace) -> tuple[list[str], str]:
    """The router's command line and readiness URL (or a second fake's, for ``--self-test``)."""
    if args.self_test:
        argv = [sys.executable, "-m", "router.testing", "--port", str(port), "--chunks", str(args.chunks),
                "--model", MODEL]
        return argv, f"http://127.0.0.1:{port}/v1/models"
    argv = [sys.executable, "-m", "router.cli", "router", "--config", str(config),
            "--host", "127.0.0.1", "--port", str(port)]
    return argv, f"http://127.0.0.1:{port}/healthz"


def run_router_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Run every scenario; print the table and return the report (also written to ``--json-out``)."""
    with tempfile.TemporaryDirectory(prefix="openweight-bench-") as tmp, \
            open(Path(tmp) / "processes.log", "w+b") as log:
        fake_port, router_port = _free_port(), _free_port()
        fake_url = f"http://127.0.0.1:{fake_port}/v1"
        router_url = f"http://127.0.0.1:{router_port}/v1"
        fake_argv = [sys.executable, "-m", "router.testing", "--port", str(fake_port),
                     "--chunks", str(args.chunks), "--model", MODEL]
        router_argv, router_ready = _router_argv(_config_file(Path(tmp), fake_url), router_port, args)
        env = {k: v for k, v in os.environ.items() if not k.startswith("OPENWEIGHT_")}  # open, loopback
        try:
            with _process("fake upstream", fake_argv, f"{fake_url}/models", log), \
                    _process("router", router_argv, router_ready, log, env) as router:
                scenarios = []
                for stream in (False, True):
                    for concurrency in args.concurrency:
                        direct = _measure("direct", fake_url, stream, concurrency, args, None)
                        routed = _measure("router", router_url, stream, concurrency, args, router.pid)
                        routed.added_p50_ms = round(routed.p50_ms - direct.p50_ms, 3)
                        routed.added_p99_ms = round(routed.p99_ms - direct.p99_ms, 3)
                        scenarios += [direct, routed]
        except RuntimeError:
            log.seek(0)
            sys.stderr.write(log.read().decode(errors="replace")[-4000:])
            raise
    report = {
        "machine": _machine(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": _command(),
        "requests": args.requests,
        "chunks": args.chunks,
        "router": "second fake upstream (--self-test)" if args.self_test else shlex.join(router_argv),
        "scenarios": [asdict(s) for s in scenarios],
    }
    print(format_report(report))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _command() -> str:
    program = sys.argv[0]
    if program.endswith(os.path.join("router", "cli.py")):
        return shlex.join(["python", "-m", "router.cli", *sys.argv[1:]])
    return shlex.join([os.path.basename(program), *sys.argv[1:]])


def format_report(report: dict[str, Any]) -> str:
    """The report as a plain-text table."""
    machine = report["machine"]
    lines = [
        f"openweight router benchmark  {report['date']}",
        f"machine: {machine['cpu']}, {machine['cores']} cores, Python {machine['python']}, {machine['system']}",
        f"command: {report['command']}",
        f"{report['requests']} requests per scenario; streams of {report['chunks']} chunks; "
        f"router: {report['router']}",
        "",
        f"{'target':<7} {'mode':<6} {'conc':>4} {'req/s':>9} {'p50 ms':>9} {'p99 ms':>9} {'+p50 ms':>8} "
        f"{'+p99 ms':>8} {'cpu ms/req':>10} {'cpu us/chunk':>12} {'errors':>6}",
    ]

    def cell(value: float | None, width: int, digits: int = 2) -> str:
        return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"

    for s in report["scenarios"]:
        lines.append(
            f"{s['target']:<7} {'stream' if s['stream'] else 'plain':<6} {s['concurrency']:>4} "
            f"{s['rps']:>9.1f} {s['p50_ms']:>9.2f} {s['p99_ms']:>9.2f} {cell(s['added_p50_ms'], 8)} "
            f"{cell(s['added_p99_ms'], 8)} {cell(s['cpu_ms_per_request'], 10, 3)} "
            f"{cell(s['cpu_us_per_chunk'], 12, 1)} {s['errors']:>6}"
        )
    return "\n".join(lines)


def _concurrency_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("a comma-separated list of positive integers, e.g. 1,32")
    return values


def _main(args: argparse.Namespace) -> int:
    report = run_router_bench(args)
    return 1 if any(s["errors"] for s in report["scenarios"]) else 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``bench router`` to the ``openweight`` command line."""
    bench = subparsers.add_parser("bench", help="benchmarks")
    kinds = bench.add_subparsers(dest="bench", required=True)
    router = kinds.add_parser(
        "router", help="latency and CPU the router adds over a fake upstream",
        description="Send the same requests straight to a fake upstream and through the router (each in "
        "its own process), plain and streaming, at each concurrency; print throughput, latency, the "
        "latency the router adds and its CPU time per request and per relayed chunk.",
    )
    router.add_argument("--requests", type=int, default=500, help="measured requests per scenario")
    router.add_argument("--concurrency", type=_concurrency_list, default=[1, 32],
                        help="comma-separated concurrency levels (default: 1,32)")
    router.add_argument("--chunks", type=int, default=100, help="tokens per answer: stream chunks")
    router.add_argument("--json-out", type=Path, help="also write the report as JSON to this file")
    router.add_argument("--self-test", action="store_true",
                        help="measure a second fake in place of the router (checks the harness)")
    router.set_defaults(func=_main)
