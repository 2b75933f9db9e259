"""Placement on a real Ray with 4 logical GPUs, through a light Serve deployment (no vLLM).

The deployment is given exactly the placement the builder computes for a TP=2 model
(:func:`cluster.placement.placement`) and starts one small actor per bundle, the way vLLM's Ray
executor starts one worker per shard. Three replicas are asked for: two fit on 4 GPUs, the third
must stay pending with a status that says why.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from cluster.config import ServeSpec
from cluster.placement import Placement, placement
from router.net import free_port
from tests.cluster.support import HAS_RAY, HAS_VLLM, quiet_vllm_import

pytestmark = pytest.mark.skipif(not HAS_RAY, reason="needs Ray")

TP2 = ServeSpec(source="x", tensor_parallel_size=2)
APP = "placement"


@pytest.fixture(scope="module")
def serve_port() -> Iterator[int]:
    from cluster.runtime import start_local_ray, start_serve

    local = start_local_ray(num_cpus=4, num_gpus=4)
    port = free_port()
    try:
        start_serve(host="127.0.0.1", port=port)
        yield port
    finally:
        local.shutdown()


def shard_deployment(plan: Placement, replicas: int) -> Any:
    """A Serve deployment placed like an LLM replica, reporting where its shards landed."""
    import ray
    from ray import serve
    from ray.util.placement_group import get_current_placement_group, placement_group_table
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    @ray.remote(num_cpus=0, num_gpus=1)
    class Shard:
        def where(self) -> tuple[list[int], str]:
            return [int(g) for g in ray.get_gpu_ids()], ray.get_runtime_context().get_node_id()

    @serve.deployment(
        num_replicas=replicas,
        placement_group_bundles=plan.deployment_bundles,
        placement_group_strategy=plan.strategy.value,
        ray_actor_options=plan.ray_actor_options(),
    )
    class Shards:
        def __init__(self) -> None:
            self.pg = get_current_placement_group()
            self.shards = [
                Shard.options(
                    scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i)
                ).remote()
                for i in range(plan.devices)
            ]

        async def __call__(self, request: Any) -> dict[str, Any]:
            table = placement_group_table(self.pg)
            where = [await shard.where.remote() for shard in self.shards]
            return {
                "replica": serve.get_replica_context().replica_id.unique_id,
                "pg": self.pg.id.hex(),
                "strategy": table["strategy"],
                "bundles": [table["bundles"][i] for i in sorted(table["bundles"])],
                "gpus": [g for gpus, _ in where for g in gpus],
                "nodes": sorted({node for _, node in where}),
            }

    return Shards.bind()


def app_status() -> Any:
    from ray import serve

    return serve.status().applications.get(APP)


def wait_for(condition: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_two_tp2_replicas_fill_4_gpus_and_a_third_stays_pending(serve_port: int) -> None:
    from ray import serve
    from ray.serve.api import RunTarget

    plan = placement(TP2)
    serve.run_many(
        [RunTarget(target=shard_deployment(plan, replicas=3), name=APP, route_prefix=f"/{APP}")],
        wait_for_ingress_deployment_creation=False,
        wait_for_applications_running=False,
    )

    def two_running() -> dict[Any, int] | None:
        app = app_status()
        if app is None or "Shards" not in app.deployments:
            return None
        states = {str(getattr(s, "value", s)): n for s, n in app.deployments["Shards"].replica_states.items()}
        return states if states.get("RUNNING") == 2 and states.get("STARTING") == 1 else None

    wait_for(two_running, 90, "two RUNNING replicas and one STARTING")

    seen: dict[str, dict[str, Any]] = {}
    with httpx.Client(base_url=f"http://127.0.0.1:{serve_port}", timeout=30) as client:
        for _ in range(60):
            report = client.get(f"/{APP}").raise_for_status().json()
            seen[report["replica"]] = report
            if len(seen) == 2:
                break
    assert len(seen) == 2, "both running replicas answer"
    reports = list(seen.values())
    for report in reports:
        assert report["strategy"] == "STRICT_PACK"
        assert [b.get("GPU") for b in report["bundles"]] == [1.0, 1.0]
        assert report["bundles"][0].get("CPU") == 1.0  # the replica actor shares the first bundle
        assert len(report["gpus"]) == 2 and len(set(report["gpus"])) == 2
        assert len(report["nodes"]) == 1
    assert reports[0]["pg"] != reports[1]["pg"], "one placement group per replica"
    assert sorted(reports[0]["gpus"] + reports[1]["gpus"]) == [0, 1, 2, 3], "no GPU is shared"

    # The third replica cannot be placed: Serve says so, naming what one replica needs.
    def pending_message() -> str | None:
        app = app_status()
        message: str = app.deployments["Shards"].message if app else ""
        return message if "to be scheduled" in message else None

    message = wait_for(pending_message, 60, "Serve's message about the unschedulable replica")
    assert "Resources required for each replica" in message and '"GPU": 1.0' in message
    assert str(getattr(app_status().status, "value", app_status().status)) == "DEPLOYING"
    serve.delete(APP)


@pytest.mark.skipif(not HAS_VLLM, reason="ray.serve.llm needs vLLM")
@quiet_vllm_import
@pytest.mark.parametrize("spec", [TP2, ServeSpec(source="x", tensor_parallel_size=4, pipeline_parallel_size=2)])
def test_ray_serve_llm_reserves_the_same_placement(serve_port: int, spec: ServeSpec) -> None:
    """What ray.serve.llm computes for the LLMServer (it needs a connected Ray) is what the light
    deployment above was given."""
    from ray.serve.llm import LLMServer

    from cluster.builder import llm_config

    options = LLMServer.get_deployment_options(llm_config("m", spec, model_source="/models/m"))
    plan = placement(spec)
    assert options["placement_group_bundles"] == [{"GPU": 0.0, **b} for b in plan.deployment_bundles]
    assert options["placement_group_strategy"] == plan.strategy.value
    assert options["ray_actor_options"]["num_cpus"] == 1.0
