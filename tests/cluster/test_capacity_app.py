"""The capacity application on a real Ray Serve (no vLLM): replica counts from Serve's controller,
and the wake-up call that Serve's autoscaler counts.

A light deployment stands in for a model's ``LLMServer``: it is named the way Ray Serve LLM names
one (``LLMServer:<model id>``), scales between 0 and 1 replica, and has the ``check_health``
method the wake-up call uses. The capacity application is built by its real builder entry
(``cluster.capacity:app_from_args``), so a Ray worker imports this tree's ``cluster`` package.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from cluster.capacity import APP_NAME, app_from_args, deployment_suffix
from router.capacity_config import CapacityConfig
from router.net import free_port
from tests.cluster.support import HAS_RAY
from tests.support import until

pytestmark = [pytest.mark.cluster, pytest.mark.skipif(not HAS_RAY, reason="needs Ray")]

MODEL = "org/fake-model-1.0"
PATH = CapacityConfig().path
DOWNSCALE_S = 3.0


@pytest.fixture(scope="module")
def serve_url() -> Iterator[str]:
    from ray import serve

    from cluster.runtime import start_local_ray, start_serve

    local = start_local_ray(num_cpus=2)
    port = free_port()
    try:
        start_serve(host="127.0.0.1", port=port)

        @serve.deployment(
            name=f"LLMServer:{deployment_suffix(MODEL)}",
            ray_actor_options={"num_cpus": 0},
            autoscaling_config={"min_replicas": 0, "max_replicas": 1, "initial_replicas": 0,
                                "downscale_delay_s": DOWNSCALE_S, "upscale_delay_s": 0},
        )
        class FakeModel:
            async def check_health(self) -> None:
                return None

            async def __call__(self, request: Any) -> str:
                return "answer"

        serve.run(FakeModel.bind(), name="models", route_prefix="/models")  # type: ignore[attr-defined]
        serve.run(app_from_args({"models": [MODEL, "not-deployed"]}), name=APP_NAME, route_prefix=PATH)
        yield f"http://127.0.0.1:{port}{PATH}"
    finally:
        local.shutdown()


def capacity(url: str) -> dict[str, Any]:
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200, response.text
    models: dict[str, Any] = response.json()["models"]
    return models


def test_a_model_at_zero_stays_there_until_a_wake_up_call_then_returns_to_zero(serve_url: str) -> None:
    found = capacity(serve_url)
    assert set(found) == {MODEL}  # a model id with no deployment is left out
    assert found[MODEL] == {"running": 0, "starting": 0, "target": 0, "max_ongoing_requests": 5}
    time.sleep(DOWNSCALE_S + 2)  # reading the route never wakes a model
    assert capacity(serve_url)[MODEL]["target"] == 0

    started = time.monotonic()
    woken = httpx.post(f"{serve_url}/wake", json={"model": MODEL, "hold_s": 60}, timeout=90)
    assert woken.status_code == 200 and woken.json() == {"model": MODEL, "running": True}
    assert time.monotonic() - started < 60
    assert capacity(serve_url)[MODEL]["running"] == 1
    assert capacity(serve_url)[MODEL]["target"] == 1

    # No call held any more: Serve scales it back to zero after its downscale delay.
    assert until(lambda: capacity(serve_url)[MODEL] == {"running": 0, "starting": 0, "target": 0,
                                                        "max_ongoing_requests": 5}, timeout_s=60, every_s=0.5)


def test_a_wake_up_call_for_an_unknown_model_or_a_bad_body_is_refused(serve_url: str) -> None:
    assert httpx.post(f"{serve_url}/wake", json={"model": "nope", "hold_s": 1}, timeout=10).status_code == 404
    assert httpx.post(f"{serve_url}/wake", json={"hold_s": 1}, timeout=10).status_code == 400
