"""Sharded replicas of the built-in model on a real 2-node Ray cluster (two raylets, CPU).

A head with 1 CPU and a worker node with 3, started with ``ray start`` as on VMs; the models are
deployed with ``openweight cluster up`` against ``RAY_ADDRESS``, through the builder and its
placement groups. Greedy answers of TP=3 and PP=2 must equal TP=1's on fixed prompts (fp32 on
every rank: no token changed in our runs; a rank count that changed the order of a reduction
enough to flip a token would show here first).

On CPU every rank is a child process of the replica (vLLM's ``mp`` executor; its Ray executor
refuses the CPU platform), so a replica's placement group is ``STRICT_PACK`` on one node: TP=3
and PP=2 both land on the 3-CPU worker node, and the head (1 CPU) cannot hold either.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from router.net import free_port
from tests.cluster.multinode import Cluster, placement_groups, start_cluster
from tests.cluster.support import HAS_RAY, HAS_VLLM

MODEL = "smollm2-135m-instruct"
PROMPTS = ("What is the capital of France?", "Name three primary colours.", "Count from 1 to 5.")
MAX_TOKENS = 24

pytestmark = [pytest.mark.cluster, pytest.mark.skipif(not (HAS_RAY and HAS_VLLM), reason="needs Ray and vLLM")]


class Deployer:
    def __init__(self, cluster: Cluster, folder: Path) -> None:
        self.cluster = cluster
        self.folder = folder
        self.url = f"http://127.0.0.1:{free_port()}/v1"

    def up(self, **serve: Any) -> None:
        """``openweight cluster up`` of the built-in model with ``serve`` (replaces what was deployed)."""
        block = {"source": f"builtin:{MODEL}", "accelerator": "cpu", "replicas": {"min": 1, "max": 1}, **serve}
        # The classic data path: these nodes run without Serve's HAProxy, which the direct path needs
        # (RAY_SERVE_ENABLE_HA_PROXY=1 in `ray start`'s environment on a real cluster).
        config = {"cluster": {"url": self.url, "data_path": "classic"}, "models": {MODEL: {"serve": block}}}
        path = self.folder / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        done = subprocess.run(
            [sys.executable, "-m", "openweight", "cluster", "up", "--config", str(path), "--timeout", "600"],
            env=self.cluster.env, capture_output=True, text=True, timeout=700,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    def answers(self) -> list[str]:
        out = []
        with httpx.Client(base_url=self.url, timeout=180) as client:
            for prompt in PROMPTS:
                body = {
                    "model": MODEL,
                    "temperature": 0,
                    "max_tokens": MAX_TOKENS,
                    "messages": [{"role": "user", "content": prompt}],
                }
                response = client.post("/chat/completions", json=body)
                assert response.status_code == 200, response.text
                out.append(response.json()["choices"][0]["message"]["content"])
        return out

    def replica_group(self, timeout_s: float = 60.0) -> dict[str, Any]:
        """The placement group of the model's one replica (once the replaced replica's is gone)."""
        deadline = time.monotonic() + timeout_s
        while True:
            groups = [g for g in placement_groups(self.cluster) if "LLMServer" in g["name"]]
            if len(groups) == 1 or time.monotonic() > deadline:
                assert len(groups) == 1, groups
                return groups[0]
            time.sleep(2)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    # SIGTERM (a `timeout` around the run) stops the nodes too, as Ctrl-C does.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    two_nodes = start_cluster([1, 3])
    try:
        yield two_nodes
    finally:
        two_nodes.stop()
        signal.signal(signal.SIGTERM, previous)


@pytest.fixture(scope="module")
def deployer(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Deployer:
    return Deployer(cluster, tmp_path_factory.mktemp("distributed"))


@pytest.fixture(scope="module")
def tp1_answers(deployer: Deployer) -> list[str]:
    deployer.up()
    answers = deployer.answers()
    assert "Paris" in answers[0]
    return answers


def test_two_raylets_with_one_and_three_cpus(cluster: Cluster) -> None:
    assert sorted(n["Resources"]["CPU"] for n in cluster.alive_nodes()) == [1.0, 3.0]


def test_tensor_parallel_3_answers_like_one_shard(deployer: Deployer, tp1_answers: list[str]) -> None:
    deployer.up(tensor_parallel_size=3)
    assert deployer.answers() == tp1_answers
    group = deployer.replica_group()
    assert group["strategy"] == "STRICT_PACK"
    assert group["bundles"] == [{"CPU": 1.0}] * 3
    assert len(set(group["nodes"])) == 1 and group["node_cpus"] == [3.0] * 3  # the worker node


def test_pipeline_parallel_2_answers_like_one_stage(deployer: Deployer, tp1_answers: list[str]) -> None:
    deployer.up(pipeline_parallel_size=2)
    assert deployer.answers() == tp1_answers
    group = deployer.replica_group()
    # Both stages run as processes of the replica on its node (vLLM's CPU executor is `mp`).
    assert group["strategy"] == "STRICT_PACK"
    assert group["bundles"] == [{"CPU": 1.0}] * 2
    assert len(set(group["nodes"])) == 1
