"""The servers the suites start: fake upstreams and the openweight router, each a process of its own."""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import yaml

from bench.harness import listening, service

MODEL = "bench-model"
"""The model every suite asks for; fakes answer under any name."""
FALLBACK = "fallback"
"""The provider name of the fallback fake in openweight's config."""


@contextlib.contextmanager
def fake_upstream(port: int, log: IO[bytes], *, chunks: int = 100, chunk_delay_s: float = 0.0,
                  status: int = 200, hang: bool = False,
                  delay_before_headers_s: float = 0.0) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m router.testing`` on 127.0.0.1:``port`` (``status``/``hang``: a failing one;
    ``delay_before_headers_s``: a slow first token)."""
    argv = [sys.executable, "-m", "router.testing", "--port", str(port), "--chunks", str(chunks),
            "--chunk-delay-s", str(chunk_delay_s), "--model", MODEL, "--status", str(status),
            "--delay-before-headers-s", str(delay_before_headers_s)]
    if hang:
        argv.append("--hang")
    # A failing fake answers no 200 (or nothing at all): accepting connections is ready enough.
    healthy = status == 200 and not hang
    ready = f"http://127.0.0.1:{port}/v1/models" if healthy else functools.partial(listening, port)
    with service(f"fake upstream :{port}", argv, ready, log, ready_timeout_s=60.0 if healthy else 30.0) as process:
        yield process


def router_config(primary_url: str, fallback_url: str | None, *, cluster: dict[str, Any] | None = None,
                  provider: dict[str, Any] | None = None, router: dict[str, Any] | None = None) -> dict[str, Any]:
    """openweight's config: :data:`MODEL` on the cluster at ``primary_url``, then the fallback provider."""
    # The primary serves the API at its URL itself, as the classic data path does.
    config: dict[str, Any] = {"cluster": {"url": primary_url, "data_path": "classic", **(cluster or {})},
                              "models": {MODEL: {"policy": "self_hosted_first"}}}
    if fallback_url is not None:
        config["providers"] = {FALLBACK: {"url": fallback_url, **(provider or {})}}
        config["models"][MODEL]["fallbacks"] = [{"provider": FALLBACK, "model": MODEL}]
    if router:
        config["router"] = router
    return config


@contextlib.contextmanager
def openweight(config: dict[str, Any], port: int, directory: Path, log: IO[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    """The router (``python -m router.cli router``) with ``config`` on 127.0.0.1:``port``, serving openly."""
    path = directory / f"openweight-{port}.yaml"
    path.write_text(yaml.safe_dump(config))
    argv = [sys.executable, "-m", "router.cli", "router", "--config", str(path), "--host", "127.0.0.1",
            "--port", str(port)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENWEIGHT_")}  # no keys: open on loopback
    with service("openweight router", argv, f"http://127.0.0.1:{port}/healthz", log, env=env) as process:
        yield process


@contextlib.contextmanager
def floor_proxy(port: int, upstream: str, log: IO[bytes], client: str = "minimal") -> Iterator[subprocess.Popen[bytes]]:
    """:mod:`bench.floor` (the least a Python proxy on uvicorn can do) in front of ``upstream``;
    ``client="aiohttp"``: the same with the router's HTTP client."""
    argv = [sys.executable, "-m", "bench.floor", "--port", str(port), "--upstream", upstream,
            "--client", client]
    with service("floor proxy", argv, f"http://127.0.0.1:{port}/healthz", log) as process:
        yield process
