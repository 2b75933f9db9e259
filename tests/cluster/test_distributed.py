"""Sharded replicas of the built-in model on a real 2-node Ray cluster (two raylets, CPU).

A head with 1 CPU and a worker node with 3, started with ``ray start`` as on VMs; the models are
deployed with ``openweight cluster up`` against ``RAY_ADDRESS``, through the builder and its
placement groups, and asked through a real router process whose only provider fallback is a
:class:`router.testing.FakeUpstream`. Greedy answers of TP=3 and PP=2 must equal TP=1's on fixed
prompts (fp32 on every rank: no token changed in our runs; a rank count that changed the order
of a reduction enough to flip a token would show here first).

On CPU every rank is a child process of the replica (vLLM's ``mp`` executor; its Ray executor
refuses the CPU platform), so a replica's placement group is ``STRICT_PACK`` on one node: TP=3
and PP=2 both land on the 3-CPU worker node, and the head (1 CPU) cannot hold either. Then that
worker node is lost mid-stream and a new one brings the replica back; last, two replicas share
the cluster behind Ray Serve LLM's prefix cache affinity router.
"""

from __future__ import annotations

import json
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
from prometheus_client.parser import text_string_to_metric_families

from cluster.router_process import RouterProcess
from router.testing import FakeUpstream
from tests.cluster.multinode import Cluster, DriverError, driver, placement_groups, start_cluster
from tests.cluster.support import HAS_RAY, HAS_VLLM

MODEL = "smollm2-135m-instruct"
PROMPTS = ("What is the capital of France?", "Name three primary colours.", "Count from 1 to 5.")
MAX_TOKENS = 24
UPSTREAM = "x-openweight-upstream"

pytestmark = [pytest.mark.cluster, pytest.mark.skipif(not (HAS_RAY and HAS_VLLM), reason="needs Ray and vLLM")]


class Deployer:
    """Deploys the built-in model on ``cluster`` and asks it through a router (started by :meth:`start_router`)."""

    def __init__(self, cluster: Cluster, folder: Path, fallback: FakeUpstream) -> None:
        self.cluster = cluster
        self.folder = folder
        self.fallback = fallback
        self.url = f"http://127.0.0.1:{cluster.take_port()}/v1"
        self.router_url = f"http://127.0.0.1:{cluster.take_port()}"
        self.path = folder / "config.yaml"
        self.client = httpx.Client(base_url=self.router_url, timeout=180)

    def write_config(self, **serve: Any) -> None:
        """The one config file of the router and ``cluster up``, with ``serve`` in the model's block."""
        block = {"source": f"builtin:{MODEL}", "accelerator": "cpu", "replicas": {"min": 1, "max": 1}, **serve}
        fast = {"failure_threshold": 2, "reset_timeout_s": 1.0}
        port = int(self.router_url.rsplit(":", 1)[1])
        config = {
            "router": {"host": "127.0.0.1", "port": port, "probe_interval_s": 0.5},
            # The classic data path: these nodes run without Serve's HAProxy, which the direct path
            # needs (RAY_SERVE_ENABLE_HA_PROXY=1 in `ray start`'s environment on a real cluster).
            "cluster": {"url": self.url, "data_path": "classic", "circuit": fast, "first_byte_timeout_s": 120,
                        "read_timeout_s": 30, "request_timeout_s": 30},
            "providers": {"fallback": {"url": self.fallback.url, "circuit": fast,
                                       "continuation": "trailing_assistant"}},
            "models": {MODEL: {"serve": block, "fallbacks": [{"provider": "fallback", "model": "fake-model"}]}},
        }
        self.path.write_text(yaml.safe_dump(config))

    def up(self, **serve: Any) -> None:
        """``openweight cluster up`` of the built-in model with ``serve`` (replaces what was deployed)."""
        self.write_config(**serve)
        done = subprocess.run(
            [sys.executable, "-m", "openweight", "cluster", "up", "--config", str(self.path), "--timeout", "600"],
            env=self.cluster.env, capture_output=True, text=True, timeout=700,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert f"  {MODEL}: {self.url}\n" in done.stdout  # where it answers (classic: cluster.url itself)

    def start_router(self) -> RouterProcess:
        self.write_config()
        with (self.folder / "router.log").open("wb") as log:
            router = RouterProcess(config_path=self.path, url=self.router_url, output=log, grace_s=1)
            router.start()
        return router

    def ask(self, body: dict[str, Any], want: str = "cluster", timeout_s: float = 120) -> httpx.Response:
        """POST ``body`` to the router until ``want`` answers it (a redeploy's replica may still be starting)."""
        seen: list[str] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            response = self.client.post("/v1/chat/completions", json=body)
            upstream = response.headers.get(UPSTREAM, f"HTTP {response.status_code}")
            if upstream == want and response.status_code == 200:
                return response
            seen.append(upstream)
            time.sleep(0.5)
        raise AssertionError(f"no answer from {want} within {timeout_s} s; answers came from {seen}")

    def answers(self) -> list[str]:
        """Greedy answers to :data:`PROMPTS`, each from the cluster through the router."""
        out = []
        for prompt in PROMPTS:
            body = {"model": MODEL, "temperature": 0, "max_tokens": MAX_TOKENS,
                    "messages": [{"role": "user", "content": prompt}]}  # fmt: skip
            out.append(self.ask(body).json()["choices"][0]["message"]["content"])
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

    def replica_status(self) -> dict[str, Any]:
        """Serve's status of the model's deployment: ``status``, ``message``, replicas by state."""
        code = """
from ray import serve
for app in serve.status().applications.values():
    for name, dep in app.deployments.items():
        if "LLMServer" in name:
            print(json.dumps({"status": getattr(dep.status, "value", dep.status), "message": dep.message,
                              "replicas": {getattr(k, "value", k): v for k, v in dep.replica_states.items()}}))
"""
        return dict(driver(self.cluster, code))


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
def deployer(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployer]:
    with FakeUpstream("fallback") as fallback:
        deployer = Deployer(cluster, tmp_path_factory.mktemp("distributed"), fallback)
        router = deployer.start_router()
        try:
            yield deployer
        finally:
            router.stop()
            deployer.client.close()


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


def stream_and_lose_the_node(deployer: Deployer, node_id: str) -> tuple[list[Any], float]:
    """Stream through the router and kill the worker node ``node_id`` once text reached the client:
    its whole process group (raylet, agents, the replica and its engine ranks) at once, as when a
    VM goes away. The events the client got and when the node died."""
    node = deployer.cluster.node_of(node_id)
    body = {"model": MODEL, "temperature": 0, "max_tokens": 150, "ignore_eos": True, "stream": True,
            "messages": [{"role": "user", "content": "Count from 1 to 100, one number per line."}]}  # fmt: skip
    events: list[Any] = []
    killed_at = 0.0
    with deployer.client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.headers[UPSTREAM] == "cluster"
        for line in response.iter_lines():
            if line.startswith("data: "):
                data = line.removeprefix("data: ")
                events.append(data if data == "[DONE]" else json.loads(data))
            if len(events) == 4 and not killed_at:
                deployer.cluster.stop_node(node, signal.SIGKILL)
                killed_at = time.monotonic()
    return events, killed_at


def serving(url: str) -> bool:
    """Whether Serve answers the model at ``url`` now (a short request timeout: no replica, no wait)."""
    body = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}
    try:
        answer = httpx.post(f"{url}/chat/completions", json=body, timeout=30,
                            headers={"x-request-timeout-seconds": "3"})
    except httpx.HTTPError:
        return False
    return answer.status_code == 200


def wait_until(what: str, check: Any, timeout_s: float, every_s: float = 1.0) -> float:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:.0f} s"
        time.sleep(every_s)
    return time.monotonic()


def test_a_lost_worker_node_s_stream_continues_and_a_new_node_brings_the_replica_back(deployer: Deployer) -> None:
    """The replica's node dies mid-stream; the router continues the stream on its
    provider and answers from it meanwhile; Serve reports the replica gone and cannot place a new one
    (the head's one CPU is too few); a new 3-CPU node joins and the replica comes back on it."""
    cluster = deployer.cluster
    lost = deployer.replica_group()["nodes"][0]
    requests_before = len(deployer.fallback.requests)
    events, killed_at = stream_and_lose_the_node(deployer, lost)

    assert events[-1] == "[DONE]" and not any(isinstance(e, dict) and "error" in e for e in events)
    text = "".join((e["choices"][0]["delta"].get("content") or "") for e in events[:-1] if e["choices"])
    continuation = "tok0 tok1 tok2 tok3 tok4 "  # the fake provider's answer
    assert text.endswith(continuation) and text != continuation
    assert deployer.fallback.requests[requests_before].body["messages"][-1]["role"] == "assistant"
    continued_at = time.monotonic()

    statuses: list[dict[str, Any]] = []

    def replica_gone() -> bool:
        try:
            statuses.append(deployer.replica_status())
        except DriverError as exc:  # while Ray takes the node out, a driver may fail: ask again
            print(f"\n{exc}")
            return False
        return statuses[-1]["replicas"].get("RUNNING", 0) == 0

    gone_at = wait_until("Serve reports the replica gone", replica_gone, timeout_s=180, every_s=0)
    assert statuses[-1]["status"] in ("UNHEALTHY", "UPDATING"), statuses[-1]
    deployer.ask({"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]},
                 want="fallback", timeout_s=120)

    node_started_at = time.monotonic()
    cluster.start_node(3)
    cluster.wait_nodes(2)
    served_at = wait_until("the replica serves again", lambda: serving(deployer.url), timeout_s=600, every_s=1)
    answers = deployer.answers()
    assert "Paris" in answers[0]
    assert deployer.replica_group()["nodes"][0] != lost
    print(f"\nnode loss: stream continued {continued_at - killed_at:.1f} s after the kill; Serve reported "
          f"{statuses[-1]['status']} ({statuses[-1]['replicas']}) at {gone_at - killed_at:.1f} s; a new node "
          f"started at {node_started_at - killed_at:.1f} s; Serve answered again at {served_at - killed_at:.1f} s "
          f"({served_at - node_started_at:.1f} s after the new node started)")


REQUEST_COUNTER = ("ray_serve_deployment_request_counter_total", "ray_serve_deployment_request_counter")


def requests_by_replica(cluster: Cluster) -> dict[str, float]:
    """Requests each LLMServer replica has handled, from the metrics agents of the live nodes."""
    counts: dict[str, float] = {}
    for node in cluster.live_nodes:
        text = httpx.get(f"http://127.0.0.1:{node.metrics_port}/metrics", timeout=10).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in REQUEST_COUNTER and "LLMServer" in sample.labels.get("deployment", ""):
                    counts[sample.labels["replica"]] = counts.get(sample.labels["replica"], 0) + sample.value
    return counts


def test_prefix_cache_affinity_sends_a_repeated_prompt_to_one_of_two_replicas(deployer: Deployer) -> None:
    """``serve.request_router: prefix_cache_affinity`` (Ray Serve LLM's PrefixCacheAffinityRouter):
    six asks of one prompt all reach the replica that served it first. Serve's default (power of two
    choices between two idle replicas) would put all six on one replica in 2 x 2^-6 = 3% of runs."""
    deployer.up(replicas={"min": 2, "max": 2}, request_router="prefix_cache_affinity")
    assert deployer.replica_status()["replicas"].get("RUNNING") == 2
    prompt = "Summarise in one sentence why the sky is blue, for a child of six who asks at bedtime."
    body = {"model": MODEL, "temperature": 0, "max_tokens": 8, "messages": [{"role": "user", "content": prompt}]}
    # Ray's metrics agents export what a replica counted every few seconds.
    counted = sum(requests_by_replica(deployer.cluster).values())
    deployer.ask(body)  # the prefix tree learns where this prompt went
    wait_until("the first request is counted",
               lambda: sum(requests_by_replica(deployer.cluster).values()) > counted, timeout_s=60)
    before = requests_by_replica(deployer.cluster)
    for _ in range(6):
        deployer.ask(body)
    expected = sum(before.values()) + 6
    wait_until("the six requests are counted", lambda: sum(requests_by_replica(deployer.cluster).values()) >= expected,
               timeout_s=60)
    after = requests_by_replica(deployer.cluster)
    grown = {replica: count - before.get(replica, 0) for replica, count in after.items()}
    assert sorted(grown.values())[-1:] == [6] and sum(grown.values()) == 6, (before, after)
