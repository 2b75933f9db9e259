"""From the config to the Ray Serve applications (``ray.serve.llm``) and to KubeRay's serveConfigV2.

Two data paths (``cluster.data_path``, see :mod:`router.cluster_routes`):

- ``direct`` (default): one application per model, named after the model's slug and routed at
  ``<cluster.url prefix>/<slug>``. Ray Serve LLM's direct streaming
  (``RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING=1``, set in each application's ``runtime_env``) makes
  the model's ``LLMServer`` replica the application's ingress, serving vLLM's own OpenAI app, so a
  token goes from the engine's front end straight to the client. Ray 2.60 allows exactly one LLM
  config per such application and needs Serve's HAProxy mode (``RAY_SERVE_ENABLE_HA_PROXY=1`` in
  the environment of every Ray process: the controller, the build task and the replicas), which
  the local stack (:mod:`cluster.runtime`) and the chart set.
- ``classic``: one application, ``openweight``, at route prefix ``/``: ``build_openai_app`` puts an
  OpenAI ingress in front of one ``LLMServer`` deployment per hosted model, behind Serve's proxy,
  and ``cluster.url`` is ``http://HOST:PORT/v1``.

- :func:`llm_config` / :func:`llm_configs` are pure: config in, ``LLMConfig`` objects out (no Ray
  cluster needed; importing ``ray.serve.llm`` needs vLLM installed).
- :func:`serve_config` writes the Serve config that KubeRay embeds as ``serveConfigV2`` and that
  ``openweight run`` / ``cluster up`` deploy; it needs neither Ray nor vLLM. Its ``import_path``
  is :func:`app_from_args`, which Serve calls inside the cluster with the ``serve`` blocks carried
  in ``args``. A built-in model is prepared by each replica on the node it runs on (the node that
  builds the application may be another one).
- :func:`build_app` turns ``LLMConfig`` objects into the Serve application; ``ray.serve.llm``
  reads the current Ray runtime environment there, so it runs inside Ray (it would otherwise
  start one).

Only the cluster's part of the config travels in ``args``: changing a provider does not redeploy
the models.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

from cluster.capacity import capacity_application
from cluster.config import Accelerator, RequestRouter, ServeSpec, parse_serve_specs
from cluster.errors import ClusterConfigError
from cluster.model import BUILTIN_PREFIX
from cluster.placement import placement
from router.cluster_routes import DataPath, route_prefix, slug
from router.settings import Settings

APP_NAME = "openweight"
ROUTE_PREFIX = "/"
IMPORT_PATH = "cluster.builder:app_from_args"
DIRECT_STREAMING_ENV = "RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING"
BACKPRESSURE_STATUS = 429
REPLICA_SETUP_CALLBACK = "cluster.engine_hooks:ReplicaSetup"
"""Replica hook, run on the replica's node: prepares a built-in model there, skips Ray's per-node
download of local folders, binds OpenMP threads per rank on CPU."""

DIRECT_STREAMING = "RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING"
"""Ray Serve LLM's switch: the LLM replica is the ingress and serves vLLM's own app (read at import)."""
HAPROXY = "RAY_SERVE_ENABLE_HA_PROXY"
"""Serve's switch for HAProxy in place of its Python proxy (read at import by every Ray Serve process)."""

Resolver = Callable[[str], str]

REQUEST_ROUTERS: dict[RequestRouter, str] = {
    RequestRouter.POWER_OF_TWO: "ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter",
    RequestRouter.PREFIX_CACHE_AFFINITY: "ray.serve.llm.request_router:PrefixCacheAffinityRouter",
}
"""``request_router_class`` of each ``serve.request_router`` (the first is Serve's default)."""


def keep_source(source: str) -> str:
    """The default :data:`Resolver`: every source unchanged; a ``builtin:`` source is prepared by
    each replica on its own node (:class:`cluster.engine_hooks.ReplicaSetup`), not where the
    application is built."""
    return source


def deployment_config(spec: ServeSpec) -> dict[str, Any]:
    """Serve deployment options of a model's ``LLMServer``: replicas, concurrency, back-pressure."""
    config: dict[str, Any] = {
        "ray_actor_options": placement(spec).ray_actor_options(),
        "max_ongoing_requests": spec.max_ongoing_requests,
        "max_queued_requests": spec.max_queued_requests if spec.max_queued_requests is not None else -1,
        "backpressure_config": {"status_code": BACKPRESSURE_STATUS, "retry_after_s": spec.retry_after_s},
    }
    if spec.request_router is not RequestRouter.POWER_OF_TWO:
        config["request_router_config"] = {
            "request_router_class": REQUEST_ROUTERS[spec.request_router],
            "request_router_kwargs": spec.request_router_options,
        }
    replicas = spec.replicas
    if replicas.autoscaling:
        config["autoscaling_config"] = {
            "min_replicas": replicas.min,
            "max_replicas": replicas.max,
            "initial_replicas": replicas.initial if replicas.initial is not None else replicas.min,
            "target_ongoing_requests": spec.target_ongoing_requests,
        }
        if replicas.downscale_delay_s is not None:
            config["autoscaling_config"]["downscale_delay_s"] = replicas.downscale_delay_s
    else:
        config["num_replicas"] = replicas.min
    return config


def llm_config_kwargs(model_id: str, spec: ServeSpec, *, model_source: str) -> dict[str, Any]:
    """The keyword arguments of ``ray.serve.llm.LLMConfig`` for one model (plain data)."""
    kwargs: dict[str, Any] = {
        "model_loading_config": {"model_id": model_id, "model_source": model_source},
        "accelerator_config": {"kind": spec.accelerator.value},
        "placement_group_config": placement(spec).placement_group_config(),
        "deployment_config": deployment_config(spec),
        "engine_kwargs": spec.engine_kwargs,
        "runtime_env": {"env_vars": spec.engine_env},
        "log_engine_metrics": True,
        "callback_config": {
            "callback_class": REPLICA_SETUP_CALLBACK,
            "callback_kwargs": setup_kwargs(model_source, spec),
        },
    }
    if spec.accelerator is Accelerator.GPU and spec.accelerator_type:
        kwargs["accelerator_type"] = spec.accelerator_type
    if spec.stream_batching_interval_ms is not None:
        kwargs["experimental_configs"] = {"stream_batching_interval_ms": spec.stream_batching_interval_ms}
    return kwargs


def setup_kwargs(model_source: str, spec: ServeSpec) -> dict[str, Any]:
    """``callback_kwargs`` of :class:`cluster.engine_hooks.ReplicaSetup` for one model."""
    kwargs: dict[str, Any] = {"cpu": spec.accelerator is Accelerator.CPU}
    if model_source.startswith(BUILTIN_PREFIX):
        kwargs["builtin"] = model_source.removeprefix(BUILTIN_PREFIX)
    return kwargs


def llm_config(model_id: str, spec: ServeSpec, *, model_source: str) -> Any:
    """The ``LLMConfig`` of one model; ``model_source`` is what vLLM loads (resolved source)."""
    from ray.serve.llm import LLMConfig

    return LLMConfig(**llm_config_kwargs(model_id, spec, model_source=model_source))


def llm_configs(specs: Mapping[str, ServeSpec], *, resolve: Resolver = keep_source) -> list[Any]:
    """``LLMConfig`` objects for ``specs`` keyed by cluster model id; ``resolve`` maps each
    ``source`` to what the replica receives (default: unchanged; a ``builtin:`` source left as it
    is is prepared by the replica on its node, a prepared folder is loaded as it is)."""
    return [llm_config(model_id, spec, model_source=resolve(spec.source)) for model_id, spec in specs.items()]


def cluster_specs(settings: Settings, specs: Mapping[str, ServeSpec]) -> dict[str, ServeSpec]:
    """Re-key ``specs`` (by public name) by the model id the cluster serves."""
    if not specs:
        raise ClusterConfigError("models: no model has a `serve` block, so the cluster has nothing to host")
    return {settings.cluster_model_id(name): spec for name, spec in specs.items()}


INGRESS_OPTIONS: dict[str, Any] = {"ray_actor_options": {"num_cpus": 0}}
"""The OpenAI ingress reserves no CPU (Serve's default is one): it only relays, and a CPU it held
on a worker node would be missing from a replica's placement group there (a head with one CPU and
a 3-CPU worker could then not hold a TP=3 replica)."""


def build_app(configs: list[Any]) -> Any:
    """The Serve application (OpenAI ingress + one LLMServer per model). Needs a connected Ray."""
    from ray.serve.llm import build_openai_app

    if os.environ.get(DIRECT_STREAMING_ENV) == "1":  # the replica is the ingress: no options of its own
        return build_openai_app({"llm_configs": configs})
    return build_openai_app({"llm_configs": configs, "ingress_deployment_config": INGRESS_OPTIONS})


def app_from_args(args: dict[str, Any]) -> Any:
    """Serve application builder named by :data:`IMPORT_PATH` in the Serve config.

    ``args`` is ``{"models": {cluster_model_id: serve_block}}`` as written by :func:`serve_config`,
    with ``"data_path": "direct"`` for an application of the direct path (exactly one model).
    """
    models = args.get("models")
    if not isinstance(models, Mapping) or not models:
        raise ClusterConfigError("args.models: a mapping of model id to `serve` block is required")
    try:
        data_path = DataPath(args.get("data_path", DataPath.CLASSIC))
    except ValueError:
        raise ClusterConfigError(f"args.data_path: {args.get('data_path')!r} is neither direct nor classic") from None
    if data_path is DataPath.DIRECT:
        check_direct_streaming(len(models))
    specs = parse_serve_specs(models)
    return build_app(llm_configs(specs))


def check_direct_streaming(models: int) -> None:
    """Raise :class:`ConfigError` unless this process builds direct-streaming applications of one model."""
    from ray.llm._internal.serve.constants import RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING

    if models != 1:
        raise ClusterConfigError(f"args.models: a direct-path application hosts exactly one model, got {models}")
    if not RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING:
        raise ClusterConfigError(f"runtime_env.env_vars.{DIRECT_STREAMING}: must be 1 for a direct-path application")


def applications(settings: Settings, specs: Mapping[str, ServeSpec]) -> list[dict[str, Any]]:
    """The Serve applications of the configured data path (``serve deploy`` format)."""
    by_id = cluster_specs(settings, specs)
    blocks = {model_id: spec.model_dump(mode="json", exclude_defaults=True) for model_id, spec in by_id.items()}
    if settings.cluster.data_path is DataPath.CLASSIC:
        return [{"name": APP_NAME, "route_prefix": ROUTE_PREFIX, "import_path": IMPORT_PATH,
                 "args": {"models": blocks}}]
    return [
        {
            "name": slug(model_id),
            "route_prefix": route_prefix(settings.cluster.url, model_id),
            "import_path": IMPORT_PATH,
            "args": {"models": {model_id: block}, "data_path": DataPath.DIRECT.value},
            "runtime_env": {"env_vars": {DIRECT_STREAMING: "1"}},
        }
        for model_id, block in sorted(blocks.items())  # by id, as the chart writes them
    ]


def serve_config(
    settings: Settings, specs: Mapping[str, ServeSpec], *, http_host: str = "0.0.0.0", http_port: int | None = None,
    with_capacity: bool = True,
) -> dict[str, Any]:
    """The Ray Serve config (``serve deploy`` format) that KubeRay embeds as ``serveConfigV2``.

    The HTTP port defaults to the port of ``cluster.url`` (8000 when it has none). On the direct
    path the cluster's Ray processes need ``RAY_SERVE_ENABLE_HA_PROXY=1`` (:data:`HAPROXY`) in their
    environment: a Serve config cannot set it. The capacity application (:mod:`cluster.capacity`)
    goes beside the models' applications unless ``with_capacity`` is false.
    """
    port = http_port if http_port is not None else urlsplit(settings.cluster.url).port or 8000
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": http_host, "port": port},
        "applications": [
            *applications(settings, specs),
            *([capacity_application(settings, cluster_specs(settings, specs))] if with_capacity else []),
        ],
    }
