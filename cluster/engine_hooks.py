"""Hooks that run inside a Serve LLM replica, on the replica's node, before its vLLM engine starts.

``ray.serve.llm`` calls :class:`ReplicaSetup` (named in ``LLMConfig.callback_config``) in the
replica's own process. On CPU the replica's vLLM engine runs every tensor- and pipeline-parallel
rank as a child process of that replica (vLLM's ``mp`` executor), so whatever is set up here is
what every rank sees:

- **Model files.** A ``builtin:NAME`` source is prepared here (:func:`cluster.model.prepare`:
  fetched and converted once per node, then checked), not where the application was built, which
  may be another node. vLLM then loads the prepared folder.
- **No per-node "download" for local folders.** Ray Serve LLM otherwise sends a task that imports
  vLLM and torch to every node of the placement group to download the weights, even for a folder
  on disk: about 45 s of a 2-core machine's start-up for nothing. Sources that are not local
  folders (Hugging Face ids, cloud mirrors) keep Ray's download.
- **OpenMP threads bound per rank (CPU).** vLLM's automatic binding (``auto``) gives each rank a
  NUMA node of its own and refuses more ranks than NUMA nodes. With fewer, each rank gets an
  explicit share of the cores this process may run on (:func:`omp_threads_bind`), unless
  ``serve.env`` sets ``VLLM_CPU_OMP_THREADS_BIND`` itself.

The replica imports this module by name; nothing else should.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from pathlib import Path

from ray.llm._internal.common.callbacks.base import CallbackBase

OMP_BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"
NUMA_ROOT = Path("/sys/devices/system/node")


def omp_threads_bind(cpus: Sequence[int], ranks: int) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` giving ``ranks`` ranks the ``cpus`` (rank lists joined by ``|``).

    With at least as many CPUs as ranks each rank gets its own contiguous slice (the first ranks
    one more CPU when they do not divide evenly); with fewer, rank ``i`` gets CPU ``i mod n``,
    so ranks share cores evenly instead of all piling on the first.

    >>> omp_threads_bind([0, 1, 2, 3], 2)
    '0,1|2,3'
    >>> omp_threads_bind([0, 1], 3)
    '0|1|0'
    """
    if ranks < 1 or not cpus:
        raise ValueError("omp_threads_bind needs at least one rank and one CPU")
    ordered = sorted(cpus)
    if len(ordered) < ranks:
        return "|".join(str(ordered[i % len(ordered)]) for i in range(ranks))
    base, extra = divmod(len(ordered), ranks)
    lists: list[str] = []
    start = 0
    for rank in range(ranks):
        size = base + (1 if rank < extra else 0)
        lists.append(",".join(str(c) for c in ordered[start : start + size]))
        start += size
    return "|".join(lists)


def numa_nodes(root: Path = NUMA_ROOT) -> int:
    """How many NUMA nodes this machine has (1 when the kernel does not say)."""
    try:
        return max(1, sum(1 for p in root.glob("node[0-9]*") if p.is_dir()))
    except OSError:
        return 1


def engine_ranks(engine_kwargs: dict[str, object]) -> int:
    """Tensor x pipeline parallel ranks of one engine."""
    tp = engine_kwargs.get("tensor_parallel_size", 1)
    pp = engine_kwargs.get("pipeline_parallel_size", 1)
    return (tp if isinstance(tp, int) else 1) * (pp if isinstance(pp, int) else 1)


class ReplicaSetup(CallbackBase):
    """Prepare a built-in model, skip Ray's download of local folders, bind OpenMP threads per rank.

    ``callback_kwargs``: ``builtin`` (a built-in model's name, prepared here) and ``cpu``
    (bind OpenMP threads: the replica runs on CPU).
    """

    async def on_before_node_init(self) -> None:
        engine = self.llm_config.get_engine_config()
        if engine is None:
            return
        if builtin := self.kwargs.get("builtin"):
            from cluster.model import prepare

            engine.hf_model_id = str(await asyncio.to_thread(prepare, str(builtin)))
        source = engine.actual_hf_model_id
        if isinstance(source, str) and await asyncio.to_thread(os.path.isdir, source):
            self.ctx.run_init_node = False
        if self.kwargs.get("cpu"):
            self._bind_omp_threads()

    def _bind_omp_threads(self) -> None:
        """Set the per-rank binding in this process's environment, which the engine's ranks inherit."""
        ranks = engine_ranks(dict(self.llm_config.engine_kwargs))
        env_vars = (self.llm_config.runtime_env or {}).get("env_vars") or {}
        if ranks < 2 or OMP_BIND_ENV in env_vars or numa_nodes() >= ranks:
            return
        os.environ[OMP_BIND_ENV] = omp_threads_bind(sorted(os.sched_getaffinity(0)), ranks)
