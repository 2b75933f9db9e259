"""Where a replica's devices go: its Ray placement group.

Each replica of a model reserves one placement group with one bundle per device (TP x PP). The
replica actor itself (the Serve LLMServer, which starts the vLLM engine) shares the first bundle,
so Ray reserves the whole replica at once or not at all: a replica that does not fit stays
pending instead of holding half its GPUs.

- GPU, TP only: the shards exchange activations on every layer, so all bundles go on one node
  (``STRICT_PACK``).
- GPU, PP > 1: stages talk once per micro-batch and may span nodes (``PACK``: one node if
  possible); vLLM's Ray executor starts one worker actor in each bundle.
- GPU: ``{"GPU": 1}`` per device, plus a tiny ``accelerator_type:<T>`` share when the config
  names a GPU type, which only nodes of that type have. The replica actor takes one CPU.
- CPU: ``{"CPU": 1}`` per rank (TP x PP), always ``STRICT_PACK``. Ray Serve LLM runs a CPU
  engine with vLLM's ``mp`` executor (ray/llm/_internal/serve/engines/vllm/vllm_models.py), and
  vLLM's Ray executor refuses the CPU platform ("current platform cpu does not support ray",
  vllm/v1/executor/ray_utils.py): every rank is a child process of the replica, on the replica's
  node. Bundles on another node would reserve cores there that the ranks never use. The replica
  actor asks for no CPU of its own: the engine runs in the replica's process tree and is
  accounted by the bundles.

This module is pure (no Ray import): :mod:`cluster.builder` hands the result to
``ray.serve.llm`` and the placement tests hand it to a plain Serve deployment.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from cluster.config import Accelerator, ServeSpec

ACCELERATOR_HINT = 0.001
"""Share of the ``accelerator_type:<T>`` resource each GPU bundle takes (Ray's own convention)."""


class Strategy(StrEnum):
    """Ray placement group strategies used for replicas."""

    STRICT_PACK = "STRICT_PACK"
    PACK = "PACK"


Bundle = dict[str, float]


@dataclass(frozen=True, kw_only=True)
class Placement:
    """The resources of one replica."""

    bundles: tuple[Bundle, ...]
    """One bundle per device, for the engine's workers."""
    strategy: Strategy
    replica_actor: Bundle
    """Resources of the replica actor itself; Ray Serve LLM adds them to the first bundle."""

    @property
    def devices(self) -> int:
        return len(self.bundles)

    @property
    def deployment_bundles(self) -> list[Bundle]:
        """The placement group Serve reserves per replica: the replica actor in the first bundle."""
        first = dict(self.bundles[0])
        for key, amount in self.replica_actor.items():
            first[key] = first.get(key, 0.0) + amount
        return [first, *(dict(b) for b in self.bundles[1:])]

    def placement_group_config(self) -> dict[str, object]:
        """``LLMConfig.placement_group_config``: the per-device bundles and the strategy."""
        return {"bundles": [dict(b) for b in self.bundles], "strategy": self.strategy.value}

    def ray_actor_options(self) -> dict[str, float]:
        """``ray_actor_options`` of the replica actor (its share of the first bundle)."""
        return {"num_cpus": self.replica_actor.get("CPU", 0.0), "num_gpus": self.replica_actor.get("GPU", 0.0)}

    def total(self, resource: str) -> float:
        """How much of ``resource`` one replica reserves in all."""
        return sum(b.get(resource, 0.0) for b in self.deployment_bundles)


def placement(spec: ServeSpec) -> Placement:
    """The placement of one replica of a model served as ``spec``."""
    spans_nodes = spec.pipeline_parallel_size > 1 and spec.accelerator is not Accelerator.CPU
    strategy = Strategy.PACK if spans_nodes else Strategy.STRICT_PACK
    if spec.accelerator is Accelerator.CPU:
        device: Bundle = {"CPU": 1.0}
        replica_actor: Bundle = {"CPU": 0.0}
    else:
        device = {"GPU": 1.0}
        if spec.accelerator_type:
            device[f"accelerator_type:{spec.accelerator_type}"] = ACCELERATOR_HINT
        replica_actor = {"CPU": 1.0}
    bundles = tuple(dict(device) for _ in range(spec.devices_per_replica))
    return Placement(bundles=bundles, strategy=strategy, replica_actor=replica_actor)
