"""The ``openweight`` command line: the router's verbs, the cluster side's and the benchmarks'.

Each part registers its own verbs (:func:`router.cli.build_parser`, :func:`cluster.cli.register`,
:func:`bench.register`); this module names them explicitly. A part that is missing something fails
here at once with its ImportError or AttributeError, except the benchmarks, which the router image
does not ship: without the ``bench`` package, ``openweight bench`` says how to install it. Missing
optional dependencies (Ray, vLLM, matplotlib) fail only the command that needs them, with one line
(:func:`cluster.errors.failure`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from cluster import cli as cluster_cli
from cluster.config import check_serve_blocks
from router import cli as router_cli
from router.cli import Register

BENCH_MISSING = (
    "openweight bench: the benchmarks are not installed here; from a checkout of the repository: "
    "pip install '.[bench]'"
)


def _bench_missing(subparsers: Any) -> None:
    parser = subparsers.add_parser("bench", help="benchmarks (not installed here)", add_help=False)
    parser.add_argument("rest", nargs=argparse.REMAINDER)
    parser.set_defaults(func=_report_bench_missing)


def _report_bench_missing(args: argparse.Namespace) -> int:
    print(BENCH_MISSING, file=sys.stderr)
    return 2


def bench_commands() -> Register:
    """``bench.register``, or a stand-in that explains how to install it when the package is absent."""
    try:
        import bench
    except ModuleNotFoundError as exc:
        if exc.name != "bench":  # the package is there but broken: say so
            raise
        return _bench_missing
    return bench.register


def build_parser() -> argparse.ArgumentParser:
    """Every verb of ``openweight``."""
    return router_cli.build_parser(
        commands=(cluster_cli.register, bench_commands()), config_checks=(check_serve_blocks,)
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``openweight`` with ``argv`` (default: the process's arguments); the exit status."""
    return router_cli.main(argv, parser=build_parser())


if __name__ == "__main__":
    sys.exit(main())
