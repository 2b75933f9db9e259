"""Helpers shared by the cluster tests."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import TypeVar

import pytest

HAS_VLLM = importlib.util.find_spec("vllm") is not None
HAS_RAY = importlib.util.find_spec("ray") is not None

F = TypeVar("F", bound=Callable[..., object])

# Importing vLLM (directly or through ray.serve.llm) imports torch APIs that warn about themselves.
_VLLM_IMPORT_WARNINGS = (
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning",
    "ignore:`torch.distributed.reduce_op` is deprecated:FutureWarning",
)


def quiet_vllm_import(test: F) -> F:
    """Ignore the warnings that importing vLLM itself emits (and only those)."""
    for spec in _VLLM_IMPORT_WARNINGS:
        test = pytest.mark.filterwarnings(spec)(test)
    return test


VLLM_IMPORT_MARKS = [pytest.mark.filterwarnings(spec) for spec in _VLLM_IMPORT_WARNINGS]
"""The marks of :func:`quiet_vllm_import`, for a module's ``pytestmark``."""
NEEDS_VLLM = [pytest.mark.skipif(not (HAS_RAY and HAS_VLLM), reason="needs Ray and vLLM"), *VLLM_IMPORT_MARKS]
"""``pytestmark`` of a module that runs the real engine: skipped without Ray and vLLM, quiet on import."""
