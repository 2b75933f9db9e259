"""The `serve:` block: validation, errors that name the key, derived values. No Ray, no vLLM import."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster.config import (
    Accelerator,
    ServeSpec,
    check_serve_blocks,
    load_cluster_config,
    parse_serve_specs,
)
from cluster.engine_args import engine_arg_names
from router.config_file import load_settings
from router.settings import ConfigError
from tests.cluster.support import HAS_VLLM, quiet_vllm_import

ROOT = Path(__file__).resolve().parents[2]
LOCAL = ROOT / "deploy/examples/local.yaml"


def errors_of(serve: dict[str, Any], name: str = "m") -> str:
    with pytest.raises(ConfigError) as info:
        parse_serve_specs({name: serve})
    return str(info.value)


def write_config(tmp_path: Path, models: dict[str, Any]) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"providers": {"p": {"url": "http://p.example/v1"}}, "models": models}))
    return path


PROVIDER_ONLY = {"policy": "provider_only", "fallbacks": [{"provider": "p", "model": "elsewhere"}]}


def test_local_example_hosts_the_builtin_model_on_cpu() -> None:
    settings, specs = load_cluster_config(LOCAL)
    spec = specs["smollm2-135m-instruct"]
    assert spec.is_builtin and spec.accelerator is Accelerator.CPU
    assert spec.devices_per_replica == 1
    assert [f.provider for f in settings.models["smollm2-135m-instruct"].fallbacks] == [
        "groq",
        "together",
        "openrouter",
    ]
    assert all(p.api_key_env for p in settings.providers.values())


def test_defaults() -> None:
    spec = ServeSpec(source="Qwen/Qwen2.5-7B-Instruct")
    assert spec.accelerator is Accelerator.GPU
    assert (spec.tensor_parallel_size, spec.pipeline_parallel_size, spec.devices_per_replica) == (1, 1, 1)
    assert (spec.replicas.min, spec.replicas.max, spec.replicas.autoscaling) == (1, 1, False)
    assert spec.max_ongoing_requests > 5  # Serve's default of 5 serialises streams
    assert spec.target_ongoing_requests == spec.max_ongoing_requests // 2
    assert spec.max_queued_requests is not None and spec.retry_after_s >= 0


@pytest.mark.parametrize(("tp", "pp", "devices"), [(1, 1, 1), (2, 1, 2), (4, 1, 4), (8, 1, 8), (4, 2, 8), (1, 3, 3)])
def test_devices_per_replica_is_tp_times_pp(tp: int, pp: int, devices: int) -> None:
    spec = ServeSpec(source="x", tensor_parallel_size=tp, pipeline_parallel_size=pp)
    assert spec.devices_per_replica == devices
    assert spec.engine_kwargs["tensor_parallel_size"] == tp
    assert spec.engine_kwargs["pipeline_parallel_size"] == pp


def test_builtin_cpu_model_gets_cpu_engine_defaults_which_engine_args_override() -> None:
    spec = ServeSpec(source="builtin:smollm2-135m-instruct", accelerator="cpu", engine_args={"max_num_seqs": 4})
    kwargs = spec.engine_kwargs
    assert kwargs["dtype"] == "float32" and kwargs["enforce_eager"] is True
    assert kwargs["max_model_len"] == 2048 and kwargs["max_num_seqs"] == 4
    assert kwargs["stream_interval"] == 4
    assert ServeSpec(source="builtin:smollm2-135m-instruct", accelerator="cpu",
                     engine_args={"stream_interval": 1}).engine_kwargs["stream_interval"] == 1
    env = spec.engine_env
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1" and env["HF_HUB_OFFLINE"] == "1"
    assert env["VLLM_NO_USAGE_STATS"] == "1"


def test_gpu_and_hub_models_get_no_cpu_defaults() -> None:
    spec = ServeSpec(source="Qwen/Qwen2.5-7B-Instruct", accelerator_type="H100")
    assert "dtype" not in spec.engine_kwargs and "enforce_eager" not in spec.engine_kwargs
    assert "VLLM_CPU_KVCACHE_SPACE" not in spec.engine_env
    assert "HF_HUB_OFFLINE" not in spec.engine_env  # a hub id must be downloadable


def test_env_values_become_strings_and_override_defaults() -> None:
    spec = ServeSpec(source="x", accelerator="cpu", env={"VLLM_CPU_KVCACHE_SPACE": 4, "FLAG": True})
    assert spec.env == {"VLLM_CPU_KVCACHE_SPACE": "4", "FLAG": "true"}
    assert spec.engine_env["VLLM_CPU_KVCACHE_SPACE"] == "4"


@pytest.mark.parametrize(
    ("serve", "expected"),
    [
        ({"source": "x", "tensor_parallel_size": 0}, "models.m.serve.tensor_parallel_size: Input should be greater"),
        ({"source": "x", "pipeline_parallel_size": -1}, "models.m.serve.pipeline_parallel_size:"),
        ({"source": "x", "replicas": {"min": 3, "max": 2}}, "models.m.serve.replicas: min (3) is greater than max"),
        ({"source": "x", "replicas": {"min": 1, "max": 2, "initial": 5}}, "models.m.serve.replicas: initial (5)"),
        ({"source": "x", "replicas": {"max": 0}}, "models.m.serve.replicas.max:"),
        ({"source": "x", "replicas": {"target": 2}}, "models.m.serve.replicas.target: Extra inputs"),
        ({"source": "x", "max_ongoing_requests": 0}, "models.m.serve.max_ongoing_requests:"),
        ({"source": "x", "max_queued_requests": 0}, "models.m.serve.max_queued_requests:"),
        ({"source": "x", "retry_after_s": -1}, "models.m.serve.retry_after_s:"),
        ({"source": "x", "accelerator": "tpu"}, "models.m.serve.accelerator: Input should be 'cpu' or 'gpu'"),
        ({"source": "x", "accelerator": "cpu", "accelerator_type": "H100"}, "accelerator_type applies to GPUs only"),
        ({"source": "builtin:nope"}, "models.m.serve.source: unknown built-in model 'nope'"),
        ({"source": " "}, "models.m.serve.source: must not be empty"),
        ({}, "models.m.serve.source: Field required"),
        ({"source": "x", "tensor_parallel": 2}, "models.m.serve.tensor_parallel: Extra inputs are not permitted"),
        ({"source": "x", "engine_args": {"model": "y"}}, "models.m.serve.engine_args: 'model' is not allowed here"),
        (
            {"source": "x", "engine_args": {"tensor_parallel_size": 2}},
            "'tensor_parallel_size' is not allowed here: use serve.tensor_parallel_size",
        ),
        ({"source": "x", "engine_args": {"data_parallel_size": 2}}, "'data_parallel_size' is not allowed here"),
        ({"source": "x", "env": {"A": None, "B": [1]}}, "models.m.serve.env: 'A', 'B': a value must be a string"),
    ],
)
def test_bad_values_name_their_key(serve: dict[str, Any], expected: str) -> None:
    assert expected in errors_of(serve)


def test_every_accelerator_type_ray_knows_is_accepted() -> None:
    from ray.util.accelerators import accelerators

    for name in ("AMD_INSTINCT_MI300x", "NVIDIA_H100", "NVIDIA_TESLA_A10G"):
        value = getattr(accelerators, name)
        assert ServeSpec(source="x", accelerator_type=value).accelerator_type == value
    assert "unknown accelerator type 'H200-ish'" in errors_of({"source": "x", "accelerator_type": "H200-ish"})


@pytest.mark.skipif(not HAS_VLLM, reason="vLLM not installed: engine argument names are not checked")
def test_unknown_engine_argument_is_rejected_by_name_with_a_suggestion() -> None:
    message = errors_of({"source": "x", "engine_args": {"max_model_length": 4096, "max_num_seqs": 8}})
    assert "models.m.serve.engine_args: 'max_model_length' is not a vLLM engine argument" in message
    assert "did you mean 'max_model_len'?" in message
    assert "max_num_seqs" not in message


@pytest.mark.skipif(not HAS_VLLM, reason="vLLM not installed")
def test_frontend_arguments_are_accepted() -> None:
    spec = ServeSpec(source="x", engine_args={"enable_auto_tool_choice": True, "tool_call_parser": "hermes"})
    assert spec.engine_kwargs["tool_call_parser"] == "hermes"


def test_unknown_accelerator_type_is_rejected() -> None:
    assert "unknown accelerator type 'H1000'" in errors_of({"source": "x", "accelerator_type": "H1000"})


def test_every_bad_model_is_reported_at_once(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        {
            "a": {"serve": {"source": "x", "replicas": {"min": 2, "max": 1}}},
            "b": {"serve": {"source": "x", "tensor_parallel_size": 0}},
            "c": PROVIDER_ONLY,
        },
    )
    with pytest.raises(ConfigError) as info:
        load_cluster_config(path)
    assert "models.a.serve.replicas" in str(info.value) and "models.b.serve.tensor_parallel_size" in str(info.value)


def test_models_without_serve_are_not_hosted(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"a": {"serve": {"source": "x"}}, "b": PROVIDER_ONLY})
    _, specs = load_cluster_config(path)
    assert list(specs) == ["a"]


def test_two_models_cannot_host_the_same_cluster_model(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        {
            "a": {"serve": {"source": "x"}, "cluster_model": "shared"},
            "b": {"serve": {"source": "y"}, "cluster_model": "shared"},
        },
    )
    with pytest.raises(ConfigError, match=r"models\.b\.cluster_model: 'shared' is already hosted for models\.a"):
        load_cluster_config(path)


def test_check_serve_blocks_validates_loaded_settings(tmp_path: Path) -> None:
    settings = load_settings(write_config(tmp_path, {"a": {"serve": {"source": "x", "replicas": {"min": -1}}}}))
    with pytest.raises(ConfigError, match=r"models\.a\.serve\.replicas\.min"):
        check_serve_blocks(settings)


def test_check_config_cli_reports_serve_errors(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"a": {"serve": {"source": "x", "pipeline_parallel_size": 0}}})
    proc = subprocess.run(
        [sys.executable, "-m", "openweight", "check-config", str(path)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 2
    assert "models.a.serve.pipeline_parallel_size" in proc.stderr


@pytest.mark.skipif(not HAS_VLLM, reason="vLLM not installed")
@quiet_vllm_import
def test_engine_argument_names_read_from_source_match_vllm_dataclasses() -> None:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import FrontendArgs

    real = {f.name for f in dataclasses.fields(AsyncEngineArgs)} | {f.name for f in dataclasses.fields(FrontendArgs)}
    assert engine_arg_names() == real


def test_config_cli_and_builder_modules_import_neither_ray_nor_vllm() -> None:
    code = (
        "import sys, cluster.config, cluster.cli, cluster.builder, cluster.placement, cluster.stack, cluster.model,"
        " cluster.foreground, cluster.router_process\n"
        "from cluster.config import parse_serve_specs\n"
        "parse_serve_specs({'m': {'source': 'x', 'engine_args': {'max_model_len': 1}}})\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'vllm', 'torch'))\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_local_stack_serves_the_cluster_url_from_the_ingress_replica_unless_every_model_scales_to_zero() -> None:
    from cluster.stack import direct_ingress

    fixed, to_zero = {"source": "x"}, {"source": "x", "replicas": {"min": 0, "max": 2}}
    assert direct_ingress(parse_serve_specs({"a": fixed}))
    assert direct_ingress(parse_serve_specs({"a": to_zero, "b": fixed}))
    # Serve scales the ingress to zero with the models; only its proxy would bring it back.
    assert not direct_ingress(parse_serve_specs({"a": to_zero, "b": to_zero}))


def test_a_router_that_would_refuse_to_start_stops_the_stack_before_anything_starts(tmp_path: Path) -> None:
    from cluster.stack import LocalStack

    path = tmp_path / "open.yaml"
    path.write_text(yaml.safe_dump({
        "router": {"host": "0.0.0.0", "port": 1},  # no client keys: the router would refuse this address
        "cluster": {"url": "http://127.0.0.1:1/v1"},
        "models": {"m": {"serve": {"source": "builtin:smollm2-135m-instruct", "accelerator": "cpu"}}},
    }))
    progress: list[str] = []
    with pytest.raises(ConfigError, match="only serves on a loopback address"):
        LocalStack(path, progress=progress.append, metrics_export_port=None).start()
    assert progress == []  # not even the model step began


def test_the_ready_message_shows_the_key_header_when_keys_come_from_a_file(tmp_path: Path) -> None:
    from cluster.foreground import ready_message
    from cluster.stack import LocalStack

    path = tmp_path / "keyed.yaml"
    path.write_text(yaml.safe_dump({
        "router": {"auth": {"keys_file": str(tmp_path / "keys.yaml")}},
        "models": {"m": {"serve": {"source": "builtin:smollm2-135m-instruct", "accelerator": "cpu"}}},
    }))
    assert "authorization: Bearer $KEY" in ready_message(LocalStack(path))


def test_ports_on_ipv6_addresses_are_checked_as_ipv6() -> None:
    import socket

    from router.net import port_free

    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as held:
        held.bind(("::1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert not port_free("::1", port)
    assert port_free("::1", port)
