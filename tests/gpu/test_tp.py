"""Tensor parallelism on real GPUs: one replica split across several GPUs answers a chat.

Skipped without at least two NVIDIA GPUs (and the CUDA build of vLLM). vLLM needs the attention
head count to divide by the TP size: the built-in SmolLM2-135M has 9 heads (3 KV heads), so it
runs at TP=3, not TP=2. ``OPENWEIGHT_TP_SOURCE`` (a Hugging Face id or a local folder) picks
another model, e.g. one with an even head count for TP=2 on a two-GPU machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

from router.net import free_port
from tests.cluster.support import NEEDS_VLLM


def gpu_count() -> int:
    if shutil.which("nvidia-smi") is None:
        return 0
    listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False).stdout
    return sum(1 for line in listing.splitlines() if line.startswith("GPU "))


GPUS = gpu_count()
SOURCE = os.environ.get("OPENWEIGHT_TP_SOURCE", "builtin:smollm2-135m-instruct")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(GPUS < 2, reason=f"needs at least 2 NVIDIA GPUs (found {GPUS})"),
    *NEEDS_VLLM,
]


def tensor_parallel_size(model_dir: Path | None) -> int:
    """The smallest TP > 1 that the model's heads allow and the GPUs hold."""
    if model_dir is None or not (model_dir / "config.json").is_file():
        return 2
    config = json.loads((model_dir / "config.json").read_text())
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    for tp in range(2, GPUS + 1):
        if heads % tp == 0 and (kv_heads % tp == 0 or tp % kv_heads == 0):
            return tp
    pytest.skip(f"{SOURCE}: {heads} attention heads allow no TP size between 2 and {GPUS}")


def test_tensor_parallel_replica_answers(tmp_path: Path) -> None:
    import ray

    from cluster.model import resolve_source
    from cluster.stack import LocalStack

    resolved = resolve_source(SOURCE)
    tp = tensor_parallel_size(Path(resolved) if Path(resolved).is_dir() else None)
    url = f"http://127.0.0.1:{free_port()}/v1"
    serve = {
        "source": SOURCE,
        "accelerator": "gpu",
        "tensor_parallel_size": tp,
        "engine_args": {"dtype": "bfloat16", "max_model_len": 2048, "gpu_memory_utilization": 0.5},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"cluster": {"url": url}, "models": {"m": {"serve": serve}}}))

    with LocalStack(path, with_router=False, metrics_export_port=None, deploy_timeout_s=900) as stack:
        groups = [g for g in ray.util.placement_group_table().values() if g["state"] == "CREATED"]
        gpu_bundles = [[b for b in g["bundles"].values() if b.get("GPU")] for g in groups]
        assert [len(b) for b in gpu_bundles if b] == [tp], "one placement group holding the replica's TP GPUs"
        body = {
            "model": "m",
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "temperature": 0,
            "max_tokens": 30,
        }
        base = stack.settings.cluster_base_url("m")  # the model's route on the direct data path
        response = httpx.post(f"{base}/chat/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        assert "Paris" in response.json()["choices"][0]["message"]["content"]
