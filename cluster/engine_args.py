"""The names of vLLM's engine arguments, for checking ``serve.engine_args`` keys.

``ray.serve.llm`` passes each ``engine_kwargs`` key either to vLLM's ``AsyncEngineArgs`` or to its
OpenAI frontend (``FrontendArgs``) and rejects anything else when the replica starts - minutes
into a deployment. Checking the names up front turns that into a config error naming the key.

Importing vLLM takes 10-20 s (it loads torch), too slow for validating a config file, so the
names are read from the dataclass definitions in vLLM's source with :mod:`ast`, without importing
it. A test compares the result with ``dataclasses.fields`` of the imported classes, so a vLLM
release that moves them is noticed.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
from pathlib import Path

# module (relative to the vllm package) -> dataclasses whose fields are engine arguments
_SOURCES: dict[str, tuple[str, ...]] = {
    "engine/arg_utils.py": ("EngineArgs", "AsyncEngineArgs"),
    "entrypoints/launchers/cli_args.py": ("BaseFrontendArgs", "FrontendArgs"),
}

RESERVED: dict[str, str] = {
    "model": "set by serve.source",
    "served_model_name": "set from the model's name (or cluster_model)",
    "tensor_parallel_size": "use serve.tensor_parallel_size",
    "pipeline_parallel_size": "use serve.pipeline_parallel_size",
    "distributed_executor_backend": "chosen by Ray Serve from serve.accelerator",
    "data_parallel_size": "scale with serve.replicas (each replica is one engine)",
}
"""Engine arguments that have their own ``serve`` field or are set by the builder."""


def _vllm_dir() -> Path | None:
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _class_fields(tree: ast.Module, names: tuple[str, ...]) -> set[str]:
    fields: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name in names:
            for item in node.body:
                if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
                    continue
                if "ClassVar" in ast.unparse(item.annotation):
                    continue
                fields.add(item.target.id)
    return fields


@functools.cache
def engine_arg_names() -> frozenset[str] | None:
    """Every key ``engine_args`` may hold, or None when vLLM is not installed (check skipped)."""
    root = _vllm_dir()
    if root is None:
        return None
    names: set[str] = set()
    for module, classes in _SOURCES.items():
        try:
            tree = ast.parse((root / module).read_text())
        except (OSError, SyntaxError):
            return None
        found = _class_fields(tree, classes)
        if not found:
            return None
        names |= found
    return frozenset(names)
