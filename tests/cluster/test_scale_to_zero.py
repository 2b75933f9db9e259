"""Scale to zero on the real stack: real Ray + vLLM (CPU) + the built-in model, the router in front,
and a fake provider on loopback.

The model has ``replicas: {min: 0, max: 1}`` and a short downscale delay. The stack comes up
without a replica; the provider covers at once (fallback reason ``cold_start``) while the router's
wake-up call makes Serve start one; then the cluster answers; the engine killed, the provider
covers again without waiting on timeouts; idle, the model goes back to zero.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import yaml

from router.net import free_port
from router.testing import FakeUpstream
from tests.cluster.support import NEEDS_VLLM

MODEL = "smollm2-135m-instruct"
UPSTREAM = "x-openweight-upstream"
DOWNSCALE_S = 10

pytestmark = [pytest.mark.cluster, *NEEDS_VLLM]


class Stack:
    def __init__(self, local: Any, provider: FakeUpstream) -> None:
        self.local = local
        self.provider = provider
        self.client = httpx.Client(base_url=local.router_url, timeout=120)
        cluster = local.settings.cluster
        self.capacity_url = cluster.url.removesuffix("/v1") + cluster.capacity.path

    def ask(self) -> httpx.Response:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "What is the capital of France?"}],
                "temperature": 0, "max_tokens": 20}
        return self.client.post("/v1/chat/completions", json=body)

    def replicas(self) -> dict[str, int]:
        found: dict[str, int] = httpx.get(self.capacity_url, timeout=10).json()["models"][MODEL]
        return found

    def metric(self, name: str, **labels: str) -> float:
        total = 0.0
        for line in self.client.get("/metrics").text.splitlines():
            if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rpartition(" ")[2])
        return total


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    from cluster.stack import LocalStack

    folder = tmp_path_factory.mktemp("zero")
    with FakeUpstream("provider") as provider:
        config = {
            "router": {"host": "127.0.0.1", "port": free_port(), "probe_interval_s": 1},
            "cluster": {"url": f"http://127.0.0.1:{free_port()}/v1", "first_byte_timeout_s": 60,
                        "circuit": {"failure_threshold": 2, "reset_timeout_s": 1.0}},
            "providers": {"provider": {"url": provider.url}},
            "models": {MODEL: {
                "serve": {"source": f"builtin:{MODEL}", "accelerator": "cpu", "max_ongoing_requests": 16,
                          "replicas": {"min": 0, "max": 1, "downscale_delay_s": DOWNSCALE_S}},
                "fallbacks": [{"provider": "provider", "model": "fake-model"}],
            }},
        }
        path = folder / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        with (folder / "router.log").open("wb") as log:
            local = LocalStack(path, router_output=log, metrics_export_port=free_port(), deploy_timeout_s=600)
            local.start()
            try:
                yield Stack(local, provider)
            finally:
                local.stop()


def until(condition: Callable[[], bool], timeout_s: float, every_s: float = 1.0) -> float:
    """Seconds until `condition` held (it is asked every `every_s`); fails after `timeout_s`."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_s, f"not within {timeout_s} s"
        time.sleep(every_s)
    return time.monotonic() - start


def test_cover_wake_return_engine_killed_and_back_to_zero(stack: Stack) -> None:
    from bench.stack import engine_processes

    assert stack.replicas()["running"] == 0  # the stack came up without waiting for a replica
    time.sleep(5)  # five probe rounds of the router: they do not wake the model
    assert stack.replicas()["target"] == 0
    started = time.monotonic()
    first = stack.ask()
    print(f"\nfirst request at zero: {time.monotonic() - started:.2f} s from {first.headers[UPSTREAM]}")
    assert first.status_code == 200 and first.headers[UPSTREAM] == "provider"
    assert first.headers["x-openweight-attempts"] == "1"  # the cluster was not tried
    assert stack.metric("openweight_fallbacks_total", reason="cold_start") >= 1

    # Requests keep coming (served by the provider): the wake-up call makes Serve start a replica.
    woke = until(lambda: stack.ask().headers[UPSTREAM] == "cluster", timeout_s=400)
    print(f"the cluster answered {woke:.0f} s after the first request")
    answer = stack.ask()
    assert answer.headers[UPSTREAM] == "cluster"
    assert "Paris" in answer.json()["choices"][0]["message"]["content"]
    assert stack.replicas()["running"] == 1

    # The engine killed: the provider covers, and no request waits for a timeout.
    for pid in engine_processes():
        os.kill(pid, signal.SIGKILL)
    answers = [stack.ask() for _ in range(10)]
    assert all(r.status_code == 200 for r in answers)
    assert "provider" in {r.headers[UPSTREAM] for r in answers}
    assert stack.metric("openweight_fallbacks_total", reason="timeout") == 0

    # Idle: Serve takes the model back to zero, and the provider covers again.
    until(lambda: (now := stack.replicas())["running"] == 0 and now["target"] == 0, timeout_s=400, every_s=2)
    time.sleep(5)  # and it stays there while the router probes
    assert stack.replicas()["target"] == 0
    covered = stack.ask()
    assert covered.headers[UPSTREAM] == "provider" and covered.headers["x-openweight-attempts"] == "1"
