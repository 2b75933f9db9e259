"""Placement, deployment options, LLMConfig and serveConfigV2, built without a running Ray."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster.builder import (
    APP_NAME,
    IMPORT_PATH,
    REPLICA_SETUP_CALLBACK,
    REQUEST_ROUTERS,
    app_from_args,
    cluster_specs,
    deployment_config,
    llm_config_kwargs,
    serve_config,
)
from cluster.config import RequestRouter, ServeSpec, load_cluster_config, parse_serve_specs
from cluster.placement import Strategy, placement
from router.settings import ConfigError, Settings
from tests.cluster.support import HAS_RAY, HAS_VLLM, quiet_vllm_import

ROOT = Path(__file__).resolve().parents[2]


def gpu(tp: int = 1, pp: int = 1, **extra: Any) -> ServeSpec:
    return ServeSpec(source="Qwen/Qwen2.5-7B-Instruct", tensor_parallel_size=tp, pipeline_parallel_size=pp, **extra)


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_tensor_parallel_replica_is_one_gpu_bundle_per_shard_on_one_node(tp: int) -> None:
    plan = placement(gpu(tp))
    assert plan.bundles == tuple({"GPU": 1.0} for _ in range(tp))
    assert plan.strategy is Strategy.STRICT_PACK
    # The replica actor (1 CPU) shares the first bundle, so the whole replica is reserved at once.
    assert plan.deployment_bundles == [{"GPU": 1.0, "CPU": 1.0}] + [{"GPU": 1.0}] * (tp - 1)
    assert plan.total("GPU") == tp and plan.total("CPU") == 1
    assert plan.ray_actor_options() == {"num_cpus": 1.0, "num_gpus": 0.0}


@pytest.mark.parametrize(("tp", "pp"), [(1, 2), (2, 2), (4, 2), (8, 2)])
def test_pipeline_parallel_replica_may_span_nodes(tp: int, pp: int) -> None:
    plan = placement(gpu(tp, pp))
    assert plan.devices == tp * pp
    assert plan.strategy is Strategy.PACK


def test_accelerator_type_adds_its_resource_to_every_gpu_bundle() -> None:
    plan = placement(gpu(2, accelerator_type="H100"))
    assert all(b["accelerator_type:H100"] == pytest.approx(0.001) for b in plan.bundles)


@pytest.mark.parametrize("tp", [1, 3])
def test_cpu_replica_is_cpu_bundles_and_a_replica_actor_without_cpu(tp: int) -> None:
    plan = placement(ServeSpec(source="x", accelerator="cpu", tensor_parallel_size=tp))
    assert plan.bundles == tuple({"CPU": 1.0} for _ in range(tp))
    assert plan.deployment_bundles == [{"CPU": 1.0}] * tp
    assert plan.ray_actor_options() == {"num_cpus": 0.0, "num_gpus": 0.0}
    assert plan.placement_group_config() == {"bundles": [{"CPU": 1.0}] * tp, "strategy": "STRICT_PACK"}


@pytest.mark.parametrize(("tp", "pp"), [(1, 2), (3, 2)])
def test_cpu_pipeline_stages_stay_on_the_replicas_node(tp: int, pp: int) -> None:
    # vLLM runs every CPU rank as a child process of the replica (its `mp` executor): a bundle on
    # another node would reserve cores there that no rank uses.
    plan = placement(ServeSpec(source="x", accelerator="cpu", tensor_parallel_size=tp, pipeline_parallel_size=pp))
    assert plan.bundles == tuple({"CPU": 1.0} for _ in range(tp * pp))
    assert plan.strategy is Strategy.STRICT_PACK


def test_fixed_replicas_and_back_pressure() -> None:
    options = deployment_config(gpu(replicas={"min": 2, "max": 2}, max_queued_requests=16, retry_after_s=3))
    assert options["num_replicas"] == 2 and "autoscaling_config" not in options
    assert options["max_queued_requests"] == 16
    assert options["backpressure_config"] == {"status_code": 429, "retry_after_s": 3.0}
    assert options["max_ongoing_requests"] == 64


def test_autoscaling_between_min_and_max() -> None:
    options = deployment_config(gpu(replicas={"min": 0, "max": 4, "initial": 1}, max_ongoing_requests=32))
    assert "num_replicas" not in options
    assert options["autoscaling_config"] == {
        "min_replicas": 0,
        "max_replicas": 4,
        "initial_replicas": 1,
        "target_ongoing_requests": 16,
    }


def test_a_downscale_delay_reaches_serve_s_autoscaling_config() -> None:
    spec = ServeSpec(source="x", replicas={"min": 0, "max": 1, "downscale_delay_s": 20})
    assert deployment_config(spec)["autoscaling_config"]["downscale_delay_s"] == 20
    default = deployment_config(ServeSpec(source="x", replicas={"min": 0}))
    assert "downscale_delay_s" not in default["autoscaling_config"]


def test_unbounded_queue_when_max_queued_requests_is_null() -> None:
    assert deployment_config(gpu(max_queued_requests=None))["max_queued_requests"] == -1


def test_serve_s_default_request_router_needs_no_config() -> None:
    assert "request_router_config" not in deployment_config(gpu())


def test_prefix_cache_affinity_is_ray_serve_llm_s_router_with_its_options() -> None:
    options = deployment_config(gpu(request_router="prefix_cache_affinity",
                                    request_router_options={"imbalanced_threshold": 8}))
    assert options["request_router_config"] == {
        "request_router_class": "ray.serve.llm.request_router:PrefixCacheAffinityRouter",
        "request_router_kwargs": {"imbalanced_threshold": 8},
    }


def test_request_router_options_are_checked_against_the_router() -> None:
    with pytest.raises(ValueError, match="imbalanced_threshold not an option of power_of_two"):
        gpu(request_router_options={"imbalanced_threshold": 8})
    with pytest.raises(ValueError, match="eviction not an option of prefix_cache_affinity"):
        gpu(request_router="prefix_cache_affinity", request_router_options={"eviction": True})


@pytest.mark.skipif(not (HAS_RAY and HAS_VLLM), reason="ray.serve.llm needs Ray and vLLM")
@quiet_vllm_import
@pytest.mark.parametrize("router", list(RequestRouter))
def test_each_request_router_is_a_class_serve_loads(router: RequestRouter) -> None:
    from ray.serve.config import RequestRouterConfig
    from ray.serve.request_router import RequestRouter as ServeRequestRouter

    config = RequestRouterConfig(request_router_class=REQUEST_ROUTERS[router])
    assert issubclass(config.get_request_router_class(), ServeRequestRouter)


def test_llm_config_kwargs_for_the_builtin_cpu_model() -> None:
    spec = ServeSpec(source="builtin:smollm2-135m-instruct", accelerator="cpu")
    kwargs = llm_config_kwargs("smollm2", spec, model_source="/models/smollm2")
    assert kwargs["model_loading_config"] == {"model_id": "smollm2", "model_source": "/models/smollm2"}
    assert kwargs["accelerator_config"] == {"kind": "cpu"}
    assert kwargs["engine_kwargs"]["dtype"] == "float32"
    assert kwargs["runtime_env"]["env_vars"]["HF_HUB_OFFLINE"] == "1"
    assert kwargs["callback_config"] == {"callback_class": REPLICA_SETUP_CALLBACK, "callback_kwargs": {"cpu": True}}
    assert "accelerator_type" not in kwargs


def test_a_builtin_source_is_left_for_the_replica_to_prepare_on_its_node() -> None:
    spec = ServeSpec(source="builtin:smollm2-135m-instruct", accelerator="cpu", tensor_parallel_size=3)
    kwargs = llm_config_kwargs("smollm2", spec, model_source=spec.source)
    assert kwargs["model_loading_config"]["model_source"] == "builtin:smollm2-135m-instruct"
    assert kwargs["callback_config"]["callback_kwargs"] == {"cpu": True, "builtin": "smollm2-135m-instruct"}
    on_gpu = llm_config_kwargs("qwen", gpu(2), model_source="Qwen/Qwen2.5-7B-Instruct")
    assert on_gpu["callback_config"]["callback_kwargs"] == {"cpu": False}


@pytest.mark.skipif(not (HAS_RAY and HAS_VLLM), reason="ray.serve.llm needs Ray and vLLM")
@quiet_vllm_import
def test_llm_config_is_built_without_a_running_ray_and_places_like_ray_serve_llm() -> None:
    import ray

    from cluster.builder import llm_config

    spec = gpu(4, accelerator_type="H100", engine_args={"max_model_len": 8192})
    config = llm_config("qwen", spec, model_source="Qwen/Qwen2.5-7B-Instruct")
    assert not ray.is_initialized()
    assert config.accelerator_type == "H100"
    engine = config.get_engine_config()
    assert engine.placement_bundles == [dict(b) for b in placement(spec).bundles]
    assert engine.placement_strategy == "STRICT_PACK"
    assert engine.num_devices == 4
    assert engine.engine_kwargs["max_model_len"] == 8192
    assert not ray.is_initialized()


@pytest.mark.skipif(not (HAS_RAY and HAS_VLLM), reason="ray.serve.llm needs Ray and vLLM")
@quiet_vllm_import
def test_replica_hook_is_importable_as_ray_loads_it() -> None:
    from ray.llm._internal.common.utils.import_utils import load_class

    from cluster.engine_hooks import ReplicaSetup

    assert load_class(REPLICA_SETUP_CALLBACK) is ReplicaSetup


REMOTE = {"policy": "provider_only", "fallbacks": [{"provider": "p", "model": "remote-model"}]}


def settings_for(models: dict[str, Any], cluster_url: str = "http://ray-head:8000/v1",
                 data_path: str = "classic") -> Settings:
    return Settings(cluster={"url": cluster_url, "data_path": data_path}, providers={"p": {"url": "https://p.example/v1"}},
                    models=models)


def test_serve_config_carries_the_serve_blocks_keyed_by_cluster_model_id() -> None:
    settings = settings_for(
        {
            "big": {
                "cluster_model": "Qwen/Qwen2.5-14B",
                "serve": {"source": "Qwen/Qwen2.5-14B", "tensor_parallel_size": 2},
            },
            "small": {"serve": {"source": "builtin:smollm2-135m-instruct", "accelerator": "cpu"}},
            "remote": REMOTE,
        }
    )
    specs = cluster_specs(settings, {"big": gpu(2), "small": ServeSpec(source="x")})
    assert list(specs) == ["Qwen/Qwen2.5-14B", "small"]
    from cluster.config import serve_specs

    config = serve_config(settings, serve_specs(settings))
    assert config["http_options"] == {"host": "0.0.0.0", "port": 8000}
    app, capacity = config["applications"]
    assert (app["name"], app["route_prefix"], app["import_path"]) == (APP_NAME, "/", IMPORT_PATH)
    assert capacity == {"name": "openweight-capacity", "route_prefix": "/openweight/capacity",
                        "import_path": "cluster.capacity:app_from_args",
                        "args": {"models": ["Qwen/Qwen2.5-14B", "small"]}}
    blocks = app["args"]["models"]
    assert blocks == {
        "Qwen/Qwen2.5-14B": {"source": "Qwen/Qwen2.5-14B", "tensor_parallel_size": 2},
        "small": {"source": "builtin:smollm2-135m-instruct", "accelerator": "cpu"},
    }
    # What the builder entry receives parses back to the same specs.
    assert parse_serve_specs(blocks) == {k: v for k, v in zip(blocks, serve_specs(settings).values(), strict=True)}


@pytest.mark.skipif(not HAS_RAY, reason="needs Ray's Serve schema")
def test_serve_config_is_a_valid_serve_deploy_config() -> None:
    from ray.serve.schema import ServeDeploySchema

    settings, specs = load_cluster_config(ROOT / "deploy/examples/local.yaml")
    config = serve_config(settings, specs)
    schema = ServeDeploySchema.model_validate(config)
    assert schema.http_options.port == 8100
    assert schema.applications[0].import_path == IMPORT_PATH
    yaml.safe_load(yaml.safe_dump(config))  # plain data


def test_direct_path_deploys_one_direct_streaming_application_per_model_at_its_route() -> None:
    settings = settings_for(
        {
            "big": {"cluster_model": "Qwen/Qwen2.5-14B", "serve": {"source": "Qwen/Qwen2.5-14B"}},
            "small": {"serve": {"source": "builtin:smollm2-135m-instruct", "accelerator": "cpu"}},
            "remote": REMOTE,
        },
        cluster_url="http://ray-head:8000/llm/v1", data_path="direct",
    )
    from cluster.config import serve_specs

    apps = serve_config(settings, serve_specs(settings))["applications"]
    assert [(a["name"], a["route_prefix"], a["import_path"]) for a in apps] == [  # sorted by model id
        ("qwen-qwen2-5-14b", "/llm/qwen-qwen2-5-14b", IMPORT_PATH), ("small", "/llm/small", IMPORT_PATH),
        ("openweight-capacity", "/openweight/capacity", "cluster.capacity:app_from_args"),  # on the Serve port
    ]
    apps = apps[:-1]
    assert apps[0]["args"] == {"models": {"Qwen/Qwen2.5-14B": {"source": "Qwen/Qwen2.5-14B"}}, "data_path": "direct"}
    assert all(a["runtime_env"] == {"env_vars": {"RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING": "1"}} for a in apps)
    # The router reaches each application where Serve routes it.
    assert settings.cluster_base_url("Qwen/Qwen2.5-14B") == "http://ray-head:8000/llm/qwen-qwen2-5-14b/v1"


@pytest.mark.skipif(not HAS_RAY, reason="needs Ray Serve LLM's constants")
def test_a_direct_application_needs_ray_s_direct_streaming_and_one_model() -> None:
    from ray.llm._internal.serve.constants import RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING

    assert not RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING  # read at import; only the application's runtime_env sets it
    block = {"source": "x"}
    with pytest.raises(ConfigError, match="RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING: must be 1"):
        app_from_args({"models": {"m": block}, "data_path": "direct"})
    with pytest.raises(ConfigError, match="exactly one model, got 2"):
        app_from_args({"models": {"m": block, "n": block}, "data_path": "direct"})
    with pytest.raises(ConfigError, match="neither direct nor classic"):
        app_from_args({"models": {"m": block}, "data_path": "fast"})


@pytest.mark.parametrize(("value", "expected"), [(None, None), (0, 0), (25, 25)])
def test_classic_path_stream_batching_interval_comes_from_the_serve_block(value: Any, expected: Any) -> None:
    spec = ServeSpec(source="x", stream_batching_interval_ms=value) if value is not None else ServeSpec(source="x")
    kwargs = llm_config_kwargs("m", spec, model_source="x")
    want = 0 if value is None else expected  # the default sends every chunk at once
    assert kwargs["experimental_configs"] == {"stream_batching_interval_ms": want}
    unset = ServeSpec(source="x", stream_batching_interval_ms=None)
    assert "experimental_configs" not in llm_config_kwargs("m", unset, model_source="x")  # Ray's own 50 ms


def test_serve_config_needs_a_hosted_model() -> None:
    settings = settings_for({"remote": REMOTE})
    with pytest.raises(ConfigError, match="no model has a `serve` block"):
        serve_config(settings, {})


def test_app_builder_rejects_bad_args_before_touching_ray() -> None:
    with pytest.raises(ConfigError, match=r"models\.m\.serve\.tensor_parallel_size"):
        app_from_args({"models": {"m": {"source": "x", "tensor_parallel_size": 0}}})
    with pytest.raises(ConfigError, match=r"args\.models"):
        app_from_args({})


def test_capacity_is_counted_from_the_controller_s_details_ingress_included() -> None:
    """Replica states arrive as a str enum; a model counts as running only while its ingress runs."""
    from enum import Enum

    from cluster.capacity import capacity_of, deployment_suffix

    class State(str, Enum):  # noqa: UP042 - as ray.serve._private.common.ReplicaState, whose str() is not its value
        RUNNING = "RUNNING"
        STARTING = "STARTING"

    def deployment(target: int, *states: State) -> dict[str, Any]:
        return {"target_num_replicas": target, "deployment_config": {"max_ongoing_requests": 64},
                "replicas": [{"state": s} for s in states]}

    model = "Qwen/Qwen2.5-7B-Instruct"
    name = f"LLMServer:{deployment_suffix(model)}"
    assert name == "LLMServer:Qwen--Qwen2_5-7B-Instruct"  # Ray Serve LLM's naming
    app = {"deployments": {name: deployment(2, State.RUNNING, State.STARTING),
                           "OpenAiIngress": deployment(1, State.RUNNING)},
           "deployment_topology": {"ingress_deployment": "OpenAiIngress"}}
    details = {"applications": {"openweight": app}}
    assert capacity_of(details, [model, "absent"]) == {
        model: {"running": 1, "starting": 1, "target": 2, "max_ongoing_requests": 64}}
    app["deployments"]["OpenAiIngress"] = deployment(1, State.STARTING)
    assert capacity_of(details, [model])[model]["running"] == 0


def test_the_scale_to_zero_example_deploys_a_model_at_zero_beside_the_capacity_application() -> None:
    settings, specs = load_cluster_config(ROOT / "deploy/examples/scale-to-zero.yaml")
    app, capacity = serve_config(settings, specs)["applications"]
    options = deployment_config(specs["smollm2-135m-instruct"])["autoscaling_config"]
    assert options["min_replicas"] == options["initial_replicas"] == 0 and options["downscale_delay_s"] == 120
    assert capacity["args"]["models"] == list(app["args"]["models"]) == ["smollm2-135m-instruct"]
    # The local stack's direct ingress serves cluster.url from the OpenAI ingress replica: no capacity route.
    (only,) = serve_config(settings, specs, with_capacity=False)["applications"]
    assert only == app


@pytest.mark.parametrize(
    ("cpus", "ranks", "bind"),
    [
        ([0, 1], 3, "0|1|0"),  # TP=3 on 2 cores: ranks share cores evenly
        ([0, 1], 2, "0|1"),
        ([0, 1, 2, 3], 2, "0,1|2,3"),
        ([0, 1, 2, 3, 4], 3, "0,1|2,3|4"),
        ([3, 1], 1, "1,3"),
    ],
)
@pytest.mark.skipif(not HAS_RAY, reason="the replica hook subclasses Ray Serve LLM's callback")
def test_omp_threads_bind_gives_each_rank_its_share_of_the_cores(cpus: list[int], ranks: int, bind: str) -> None:
    from cluster.engine_hooks import omp_threads_bind

    assert omp_threads_bind(cpus, ranks) == bind


def test_cpu_pipeline_stages_trace_once_instead_of_eager_so_later_stages_get_their_buffers() -> None:
    spec = ServeSpec(source="builtin:smollm2-135m-instruct", accelerator="cpu", pipeline_parallel_size=2)
    assert spec.engine_kwargs["enforce_eager"] is False
    assert spec.engine_kwargs["compilation_config"] == {"mode": 2, "backend": "eager"}
    tp3 = ServeSpec(source="builtin:smollm2-135m-instruct", accelerator="cpu", tensor_parallel_size=3)
    assert tp3.engine_kwargs["enforce_eager"] is True and "compilation_config" not in tp3.engine_kwargs
    own = ServeSpec(source="builtin:smollm2-135m-instruct", accelerator="cpu", pipeline_parallel_size=2,
                    engine_args={"compilation_config": {"mode": 3}})  # fmt: skip
    assert own.engine_kwargs["compilation_config"] == {"mode": 3} and own.engine_kwargs["enforce_eager"] is True


@pytest.mark.parametrize("call", [
    [], "x", {"hold_s": 5}, {"model": 1, "hold_s": 5}, {"model": "m"}, {"model": "m", "hold_s": "5"},
    {"model": "m", "hold_s": True}, {"model": "m", "hold_s": 0}, {"model": "m", "hold_s": -1},
    {"model": "m", "hold_s": float("nan")}, {"model": "m", "hold_s": float("inf")},
])
def test_a_wake_up_call_needs_a_model_and_a_finite_positive_hold(call: Any) -> None:
    from cluster.capacity import wake_call

    with pytest.raises(ValueError):
        wake_call(call)


def test_a_wake_up_call_is_held_at_most_five_minutes() -> None:
    from cluster.capacity import MAX_HOLD_S, wake_call

    assert wake_call({"model": "m", "hold_s": 2}) == ("m", 2.0)
    assert wake_call({"model": "m", "hold_s": 1e300}) == ("m", MAX_HOLD_S)
