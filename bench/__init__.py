"""``openweight bench <suite>``: benchmarks that print a table, write JSON and draw a chart.

A package of its own, above the router and the cluster side (it starts both), installed with the
``bench`` extra and not shipped in the router image; :func:`register` adds its verbs to the
``openweight`` command (:mod:`openweight.cli`).

Suites: ``overhead`` (openweight and LiteLLM against a fast fake upstream), ``failover`` (time to
first token while the cluster refuses, hangs or answers 503, and back), ``e2e`` (the local stack
against vLLM's own server), ``soak`` (a vLLM replica killed under load), ``coldstart`` (a model
scaled to zero: Serve alone and the router without and with capacity awareness). ``router`` is
``overhead`` without LiteLLM.
"""

from __future__ import annotations

import argparse
import signal
import sys
from importlib import import_module
from pathlib import Path
from typing import Any

_SUITES = {
    "overhead": ("bench.overhead", "latency and CPU openweight and LiteLLM add over a fast fake upstream"),
    "router": ("bench.overhead", "the overhead suite without LiteLLM (openweight only)"),
    "failover": ("bench.failover", "time to first token while the cluster refuses, hangs or answers 503"),
    "e2e": ("bench.e2e", "tokens/s and TTFT through the local stack vs vLLM's own server"),
    "soak": ("bench.soak", "steady streaming load while the vLLM replica is killed"),
    "coldstart": ("bench.coldstart", "time to first token while a model scaled to zero starts again"),
    "parallel": ("bench.parallel", "tokens/s and TTFT of the engine: one shard vs TP=3 vs PP=2 (CPU)"),
}


def positive_ints(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("a comma-separated list of positive integers, e.g. 1,32")
    return values


def names(choices: tuple[str, ...]) -> Any:
    def parse(text: str) -> list[str]:
        values = [part.strip() for part in text.split(",") if part.strip()]
        unknown = [v for v in values if v not in choices]
        if not values or unknown:
            raise argparse.ArgumentTypeError(f"a comma-separated list of {', '.join(choices)}")
        return values

    return parse


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, help="folder for the JSON and PNG files (default: bench-results/)")
    parser.add_argument("--no-chart", dest="chart", action="store_false", help="do not draw the PNG chart")


def _overhead(parser: argparse.ArgumentParser, litellm: bool) -> None:
    parser.add_argument("--requests", type=int, default=1000, help="measured requests per scenario")
    parser.add_argument("--concurrency", type=positive_ints, default=[1, 8, 32, 128] if litellm else [1, 32],
                        help="comma-separated concurrency levels")
    parser.add_argument("--chunks", type=int, default=100, help="tokens per answer: stream chunks")
    parser.add_argument("--chunk-delay-s", type=float, default=0.0,
                        help="the fake upstream's seconds before each chunk (0: as fast as it can; an engine "
                        "sends one token at a time)")
    targets = ("direct", "floor", "floor-aiohttp", "openweight", "openweight-keyed", "openweight-redis", "litellm")
    parser.add_argument("--targets", type=names(targets),
                        default=list(targets) if litellm else ["direct", "openweight"],
                        help="comma-separated: direct, floor (a bare uvicorn pass-through proxy), floor-aiohttp "
                        "(the same with the router's HTTP client), openweight, openweight-keyed (a key with a rate "
                        "limit and a budget, a priced provider with a budget: in-process state), openweight-redis "
                        "(the same with shared state in a local redis-server), litellm")
    parser.add_argument("--litellm-requests", type=int, default=200,
                        help="measured requests per scenario for LiteLLM (slower: fewer are enough for its CPU)")
    parser.add_argument("--json-out", type=Path, help="also copy the JSON report to this file")
    parser.add_argument("--state-route", choices=("cluster", "provider"), default="cluster",
                        help="openweight-keyed/-redis: requests served by the cluster (one state call each) or "
                        "by a priced provider (a reservation and a settlement: two)")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _run(args: argparse.Namespace) -> int:
    module = import_module(_SUITES[args.suite][0])
    # SIGTERM stops a suite as Ctrl-C does, through every `finally`: the servers it started stop too.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        result: dict[str, Any] = module.run(args)
    except Exception as exc:
        found = _failure(exc)
        if found is None:
            raise
        message, code = found
        print(f"openweight bench {args.suite}: {message}", file=sys.stderr)
        return code
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 1 if result.get("failed") else 0


def _failure(exc: Exception) -> tuple[str, int] | None:
    """The line and exit status a suite ends with after ``exc``: a process it needs did not start
    (:class:`BenchError`, its log's tail already printed), matplotlib is missing for the chart, or
    the local stack failed (:func:`cluster.errors.failure`: the config, a model, Ray, Ray or vLLM
    not installed)."""
    from bench.harness import BenchError
    from cluster.errors import failure

    if isinstance(exc, BenchError):
        return str(exc), 1
    if isinstance(exc, ModuleNotFoundError) and exc.name == "matplotlib":
        return "matplotlib is not installed (pip install '.[bench]', or pass --no-chart)", 1
    return failure(exc)


def register(subparsers: Any) -> None:
    """Add ``bench <suite>`` to the ``openweight`` command line."""
    bench = subparsers.add_parser("bench", help="benchmarks: print a table, write JSON and a chart")
    suites = bench.add_subparsers(dest="suite", required=True)
    for suite, (module, help_text) in _SUITES.items():
        parser = suites.add_parser(suite, help=help_text, description=import_module(module).__doc__)
        if suite in ("overhead", "router"):
            _overhead(parser, litellm=suite == "overhead")
        else:
            import_module(module).add_arguments(parser)
        _common(parser)
        parser.set_defaults(func=_run, suite=suite)
