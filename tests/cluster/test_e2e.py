"""End to end: real Ray + real vLLM (CPU) + the built-in model, behind the real router.

One local stack for the whole module (the same :class:`cluster.stack.LocalStack` as
``openweight run``, on the default direct data path): the model's Serve application on a private
Ray behind Serve's HAProxy, and the router as a child process whose only provider fallback is a
:class:`router.testing.FakeUpstream`. Deleting the Serve app moves traffic to the fallback;
deploying it again brings it back to the cluster.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from router.net import free_port
from router.testing import FakeUpstream
from tests.cluster.support import NEEDS_VLLM
from tests.deploy import support as deploy_support

MODEL = "smollm2-135m-instruct"
QUESTION = "What is the capital of France?"
UPSTREAM = "x-openweight-upstream"

pytestmark = [pytest.mark.cluster, *NEEDS_VLLM]


class Stack:
    def __init__(self, local: Any, fallback: FakeUpstream, router_log: Path, metrics_url: str) -> None:
        self.local = local
        self.fallback = fallback
        self.router_log = router_log
        self.metrics_url = metrics_url
        """Ray's metrics agent (``ray_serve_*``, ``ray_vllm_*``), as Prometheus scrapes it."""
        self.client = httpx.Client(base_url=local.router_url, timeout=120)


# Module scope: one Ray per process at a time, and the placement tests start their own.
@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    from cluster.stack import LocalStack

    folder = tmp_path_factory.mktemp("e2e")
    fast = {"failure_threshold": 2, "reset_timeout_s": 1.0}
    with FakeUpstream("fallback") as fallback:
        config = {
            "router": {"host": "127.0.0.1", "port": free_port(), "probe_interval_s": 0.5},
            "cluster": {"url": f"http://127.0.0.1:{free_port()}/v1", "first_byte_timeout_s": 60, "circuit": fast},
            "providers": {"fallback": {"url": fallback.url, "circuit": fast, "continuation": "trailing_assistant"}},
            "models": {
                MODEL: {
                    # Small limits, so that a handful of requests reach Serve's back-pressure.
                    "serve": {"source": f"builtin:{MODEL}", "accelerator": "cpu", "max_ongoing_requests": 4,
                              "max_queued_requests": 2, "retry_after_s": 2},
                    "fallbacks": [{"provider": "fallback", "model": "fake-model"}],
                }
            },
        }
        path = folder / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        router_log = folder / "router.log"
        metrics_port = free_port()
        with router_log.open("wb") as log:
            local = LocalStack(path, router_output=log, metrics_export_port=metrics_port, deploy_timeout_s=600)
            local.start()
            try:
                yield Stack(local, fallback, router_log, f"http://127.0.0.1:{metrics_port}/metrics")
            finally:
                local.stop()


def chat(stream: bool = False) -> dict[str, Any]:
    messages = [{"role": "user", "content": QUESTION}]
    return {"model": MODEL, "messages": messages, "temperature": 0, "max_tokens": 30, "stream": stream}


def completion(stream: bool = False) -> dict[str, Any]:
    prompt = "The capital of France is"
    return {"model": MODEL, "prompt": prompt, "temperature": 0, "max_tokens": 8, "stream": stream}


def sse_events(response: httpx.Response) -> list[Any]:
    events: list[Any] = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_chat(stack: Stack) -> None:
    response = stack.client.post("/v1/chat/completions", json=chat())
    assert response.status_code == 200, response.text
    assert response.headers[UPSTREAM] == "cluster"
    body = response.json()
    assert body["model"] == MODEL
    assert "Paris" in body["choices"][0]["message"]["content"]


def test_chat_stream(stack: Stack) -> None:
    with stack.client.stream("POST", "/v1/chat/completions", json=chat(stream=True)) as response:
        assert response.status_code == 200
        assert response.headers[UPSTREAM] == "cluster"
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"])
    assert "Paris" in text


def test_completion(stack: Stack) -> None:
    response = stack.client.post("/v1/completions", json=completion())
    assert response.status_code == 200, response.text
    assert response.headers[UPSTREAM] == "cluster"
    assert "Paris" in response.json()["choices"][0]["text"]


def test_completion_stream(stack: Stack) -> None:
    with stack.client.stream("POST", "/v1/completions", json=completion(stream=True)) as response:
        assert response.status_code == 200
        assert response.headers[UPSTREAM] == "cluster"
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    assert "Paris" in "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"])


def model_base(stack: Stack) -> str:
    return stack.local.settings.cluster_base_url(MODEL)


def test_the_model_s_route_serves_vllm_s_own_app_and_cluster_url_serves_nothing(stack: Stack) -> None:
    """Direct path: ``<cluster.url prefix>/<model>/v1`` is vLLM's OpenAI app in the replica (it also
    answers what Ray's OpenAI ingress does not route, e.g. ``/v1/responses``); ``cluster.url`` itself
    and an unknown route get HAProxy's plain 404, which the router treats as "not served here"."""
    base = model_base(stack)
    assert base == stack.local.settings.cluster.url.replace("/v1", f"/{MODEL}/v1")
    models = httpx.get(f"{base}/models", timeout=30)
    assert models.status_code == 200 and [m["id"] for m in models.json()["data"]] == [MODEL]
    answer = httpx.post(f"{base}/responses", json={"model": MODEL, "input": QUESTION, "max_output_tokens": 16},
                        timeout=120)
    assert answer.status_code == 200, answer.text
    for url in (f"{stack.local.settings.cluster.url}/models", base.replace(MODEL, MODEL.upper()) + "/models"):
        missing = httpx.get(url, timeout=30)
        assert missing.status_code == 404 and missing.headers["content-type"].startswith("text/plain"), url


def test_a_full_replica_answers_429_with_retry_after(stack: Stack) -> None:
    """Serve's back-pressure on the direct path: past max_ongoing (4) + max_queued (2), 429 at once."""
    body = {**completion(), "max_tokens": 48, "ignore_eos": True}
    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda _: httpx.post(f"{model_base(stack)}/completions", json=body, timeout=300),
                                range(10)))
    codes = sorted(a.status_code for a in answers)
    assert set(codes) == {200, 429} and codes.count(200) >= 6, codes
    assert all(a.headers["retry-after"] == "2" for a in answers if a.status_code == 429)


def test_request_timeout_header_gives_408(stack: Stack) -> None:
    body = {**completion(), "max_tokens": 300, "ignore_eos": True}
    answer = httpx.post(f"{model_base(stack)}/completions", json=body, timeout=300,
                        headers={"x-request-timeout-seconds": "1"})
    assert answer.status_code == 408, answer.text


def test_every_ray_metric_the_dashboards_and_rules_query_is_exported(stack: Stack) -> None:
    """A real scrape of the metrics agent carries every ray_* name in deploy/ (list: tests/deploy).

    Engine gauges (running, waiting, KV cache) are only exported while the engine reports them,
    so the agent is scraped while a long stream runs; error counters only exist after an error, so
    one request goes straight to Serve for a model it does not have (a 404 from vLLM's app).
    """
    wanted = {name for name in deploy_support.expected_names() if name.startswith("ray_")}
    assert any(n.startswith("ray_vllm_") for n in wanted) and any(n.startswith("ray_serve_") for n in wanted)
    serve = httpx.Client(base_url=model_base(stack), timeout=60)
    assert serve.post("/chat/completions", json={**chat(), "model": "no-such-model"}).status_code == 404
    body = {**chat(stream=True), "max_tokens": 400, "ignore_eos": True}
    exported: set[str] = set()
    with ThreadPoolExecutor(1) as pool:
        streaming = pool.submit(lambda: serve.post("/chat/completions", json=body))
        deadline = time.monotonic() + 120
        while not wanted <= exported and time.monotonic() < deadline:
            exported |= deploy_support.sampled_names(httpx.get(stack.metrics_url, timeout=10).text)
            time.sleep(1)
        assert streaming.result().status_code == 200
    missing = wanted - exported
    assert not missing, f"queried by deploy/ but not exported by Ray's metrics agent: {sorted(missing)}"


def upstream_of_next_answer(stack: Stack, want: str, timeout_s: float) -> tuple[str, list[str]]:
    """Ask until the answer comes from ``want``; return it and what answered before."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        response = stack.client.post("/v1/chat/completions", json=chat())
        upstream = response.headers.get(UPSTREAM, f"HTTP {response.status_code}")
        if upstream == want and response.status_code == 200:
            return upstream, seen
        seen.append(upstream)
        time.sleep(0.5)
    raise AssertionError(f"no answer from {want} within {timeout_s} s; answers came from {seen}")


def test_fallback_while_the_app_is_gone_then_back_to_the_cluster(stack: Stack) -> None:
    stack.local.undeploy()
    requests_before = len(stack.fallback.requests)
    upstream, _ = upstream_of_next_answer(stack, "fallback", timeout_s=30)
    assert upstream == "fallback"
    assert stack.fallback.requests[requests_before].body["model"] == "fake-model"

    stack.local.deploy()
    upstream, _ = upstream_of_next_answer(stack, "cluster", timeout_s=60)
    response = stack.client.post("/v1/chat/completions", json=chat())
    assert response.headers[UPSTREAM] == "cluster"
    assert "Paris" in response.json()["choices"][0]["message"]["content"]


def test_a_killed_engine_s_replica_is_replaced_and_serves_again(stack: Stack) -> None:
    """The fault soak's event: SIGKILL the engine. The router falls back meanwhile; Serve replaces the
    replica, whose successor listens on a port of its own (never its dead predecessor's), and traffic
    returns to the cluster."""
    from bench.stack import kill_engine

    assert kill_engine(), "no engine process found"
    assert upstream_of_next_answer(stack, "fallback", timeout_s=60)[0] == "fallback"
    upstream_of_next_answer(stack, "cluster", timeout_s=300)
    assert httpx.get(f"{model_base(stack)}/models", timeout=30).status_code == 200

def test_a_stream_whose_engine_is_killed_continues_on_the_provider(stack: Stack) -> None:
    """Last in the module: the replica is left to come back on its own."""
    from bench.stack import engine_processes

    question = "Count from 1 to 300, one number per line."
    body = {"model": MODEL, "messages": [{"role": "user", "content": question}], "temperature": 0,
            "max_tokens": 400, "ignore_eos": True, "stream": True}
    requests_before = len(stack.fallback.requests)
    events: list[Any] = []
    with stack.client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.headers[UPSTREAM] == "cluster"
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
            if len(events) == 4:  # some text reached the client: kill the engine under it
                engines = engine_processes()
                assert engines
                for pid in engines:
                    os.kill(pid, signal.SIGKILL)
    assert events[-1] == "[DONE]" and not any(isinstance(e, dict) and "error" in e for e in events)
    text = "".join((e["choices"][0]["delta"].get("content") or "") for e in events[:-1] if e["choices"])
    continuation = "tok0 tok1 tok2 tok3 tok4 "  # the fake provider's answer
    assert text.endswith(continuation) and text != continuation
    cluster_part = text.removesuffix(continuation)
    assert cluster_part.startswith("1")
    sent = stack.fallback.requests[requests_before].body
    assert sent["messages"] == [{"role": "user", "content": question}, {"role": "assistant", "content": cluster_part}]
    assert sent["max_tokens"] < 400 and sent["ignore_eos"] is True
