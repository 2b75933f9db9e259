"""The fake OpenAI-compatible server, exercised over real HTTP."""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from router.testing import PROMPT_TOKENS, Behavior, FakeUpstream

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream("prov") as upstream:
        yield upstream


@pytest.fixture
def client(fake: FakeUpstream) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fake.url, timeout=5) as http:
        yield http


def events(lines: Iterator[str]) -> list[Any]:
    """The SSE data payloads, JSON-decoded except for ``[DONE]``."""
    out: list[Any] = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_chat_completion_looks_like_openai(fake: FakeUpstream, client: httpx.Client) -> None:
    response = client.post("/chat/completions", json=CHAT, headers={"X-Custom": "yes"})
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion" and body["model"] == "m" and body["id"].startswith("chatcmpl-")
    message = {"role": "assistant", "content": "tok0 tok1 tok2 tok3 tok4 "}
    assert body["choices"] == [{"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}]
    assert body["usage"] == {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": 5,
                             "total_tokens": PROMPT_TOKENS + 5}
    [received] = fake.requests
    assert (received.method, received.path, received.body) == ("POST", "/v1/chat/completions", CHAT)
    assert received.headers["x-custom"] == "yes" and not received.stream
    assert received.completed and not received.disconnected


def test_completions_and_embeddings(fake: FakeUpstream, client: httpx.Client) -> None:
    text = client.post("/completions", json={"model": "m", "prompt": "a"}).json()
    assert text["object"] == "text_completion" and text["choices"][0]["text"] == "tok0 tok1 tok2 tok3 tok4 "
    embedding = client.post("/embeddings", json={"model": "e", "input": ["a", "b"]}).json()
    assert embedding["object"] == "list" and embedding["model"] == "e"
    assert [item["index"] for item in embedding["data"]] == [0, 1]
    assert all(isinstance(x, float) for x in embedding["data"][0]["embedding"])
    assert len(client.post("/embeddings", json={"model": "e", "input": "a"}).json()["data"]) == 1


def test_chat_stream(client: httpx.Client) -> None:
    request = {**CHAT, "stream": True, "max_tokens": 3}
    with client.stream("POST", "/chat/completions", json=request) as response:
        assert response.headers["content-type"] == "text/event-stream"
        chunks = events(response.iter_lines())
    assert chunks[-1] == "[DONE]"
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "m" for c in chunks[:-1])
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "tok0 "}
    contents = [c["choices"][0]["delta"].get("content") for c in chunks[1:5]]
    assert contents == ["tok1 ", "tok2 ", "tok3 ", "tok4 "]
    assert chunks[5]["choices"][0]["finish_reason"] == "stop" and chunks[5]["choices"][0]["delta"] == {}
    assert len(chunks) == 7 and all("usage" not in c for c in chunks[:-1])


def test_stream_usage_chunk(fake: FakeUpstream, client: httpx.Client) -> None:
    fake.default = Behavior(chunks=2)
    request = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/chat/completions", json=request) as response:
        chunks = events(response.iter_lines())
    *rest, usage, done = chunks
    assert done == "[DONE]"
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": 2,
                              "total_tokens": PROMPT_TOKENS + 2}
    assert len(rest) == 3 and all(c["usage"] is None for c in rest)


def test_completions_stream(client: httpx.Client) -> None:
    request = {"model": "m", "prompt": "a", "stream": True}
    with client.stream("POST", "/completions", json=request) as response:
        chunks = events(response.iter_lines())
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == "tok0 tok1 tok2 tok3 tok4 "
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop" and chunks[-1] == "[DONE]"


def test_the_openai_sdk_reads_it(fake: FakeUpstream) -> None:
    sdk = openai.OpenAI(base_url=fake.url, api_key="x", max_retries=0)
    try:
        answer = sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert answer.choices[0].message.content == "tok0 tok1 tok2 tok3 tok4 "
        stream = sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                             stream=True, stream_options={"include_usage": True})
        parts = list(stream)
        text = "".join(p.choices[0].delta.content or "" for p in parts if p.choices)
        assert text == answer.choices[0].message.content
        assert parts[-1].usage is not None and parts[-1].usage.completion_tokens == 5
    finally:
        sdk.close()


def test_chunks_are_delivered_one_by_one(fake: FakeUpstream, client: httpx.Client) -> None:
    fake.default = Behavior(chunks=3, chunk_delay_s=0.1)
    arrivals = []
    with client.stream("POST", "/chat/completions", json={**CHAT, "stream": True}) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                arrivals.append(time.monotonic())
    gaps = [b - a for a, b in itertools.pairwise(arrivals[:3])]
    assert len(arrivals) == 5 and all(gap > 0.05 for gap in gaps)


def test_status_headers_and_bodies(fake: FakeUpstream, client: httpx.Client) -> None:
    fake.script(Behavior(status=429, headers={"Retry-After": "2"}), Behavior(status=502, body=b"bad gateway"),
                Behavior(status=503))
    limited = client.post("/chat/completions", json=CHAT)
    assert limited.status_code == 429 and limited.headers["retry-after"] == "2"
    assert limited.json()["error"]["type"] == "rate_limit_exceeded"
    raw = client.post("/chat/completions", json=CHAT)
    assert (raw.status_code, raw.content) == (502, b"bad gateway")
    overloaded = client.post("/chat/completions", json={**CHAT, "stream": True})
    assert overloaded.status_code == 503 and overloaded.json()["error"]["type"] == "server_error"
    assert client.post("/chat/completions", json=CHAT).status_code == 200  # the script is used up
    assert [r.completed for r in fake.requests] == [True] * 4


def test_delay_before_headers(fake: FakeUpstream, client: httpx.Client) -> None:
    fake.script(Behavior(delay_before_headers_s=0.3))
    started = time.monotonic()
    assert client.post("/chat/completions", json=CHAT).status_code == 200
    assert time.monotonic() - started >= 0.3


def test_cut_stream_is_a_protocol_error(fake: FakeUpstream, client: httpx.Client) -> None:
    fake.script(Behavior(chunks=5, cut_after=2))
    seen = []
    with pytest.raises(httpx.RemoteProtocolError), \
            client.stream("POST", "/chat/completions", json={**CHAT, "stream": True}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            seen.extend(events(iter([line])))
    assert [c["choices"][0]["delta"]["content"] for c in seen] == ["tok0 ", "tok1 "]
    assert not fake.requests[0].completed and not fake.requests[0].disconnected
    assert client.post("/chat/completions", json=CHAT).status_code == 200  # the server lives on


def test_omit_done_ends_cleanly(fake: FakeUpstream, client: httpx.Client) -> None:
    fake.script(Behavior(omit_done=True))
    with client.stream("POST", "/chat/completions", json={**CHAT, "stream": True}) as response:
        chunks = events(response.iter_lines())
    assert "[DONE]" not in chunks and chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert fake.requests[0].completed


def test_hang_until_the_client_leaves(fake: FakeUpstream) -> None:
    fake.script(Behavior(hang=True))
    with httpx.Client(timeout=httpx.Timeout(5, read=0.3)) as http, pytest.raises(httpx.ReadTimeout):
        http.post(f"{fake.url}/chat/completions", json=CHAT)
    assert fake.wait_for_disconnect(5)
    assert fake.requests[0].disconnected and not fake.requests[0].completed
    assert not fake.wait_for_disconnect(0.05)  # each abandonment counts once


def test_client_leaving_a_stream_is_seen(fake: FakeUpstream, client: httpx.Client) -> None:
    fake.script(Behavior(chunks=50, chunk_delay_s=0.05))
    with client.stream("POST", "/chat/completions", json={**CHAT, "stream": True}) as response:
        next(response.iter_lines())
    assert fake.wait_for_disconnect(5)
    assert fake.requests[0].disconnected and not fake.requests[0].completed


def test_models_probe(fake: FakeUpstream, client: httpx.Client) -> None:
    fake.models = ["a", "b"]
    listed = client.get("/models").json()
    assert [m["id"] for m in listed["data"]] == ["a", "b"] and listed["object"] == "list"
    fake.models_status = 503
    assert client.get("/models").status_code == 503
    assert fake.probes == 2 and fake.requests == []


def test_unknown_paths_and_methods(fake: FakeUpstream, client: httpx.Client) -> None:
    missing = client.post("/nothing", json={})
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    assert client.get("/chat/completions").status_code == 405
    assert fake.requests == []


def test_a_body_that_is_not_json_is_kept_raw(fake: FakeUpstream, client: httpx.Client) -> None:
    client.post("/chat/completions", content=b"not json")
    assert fake.requests[0].body == b"not json" == fake.requests[0].raw


def test_stop_releases_hanging_requests() -> None:
    fake = FakeUpstream(default=Behavior(hang=True)).__enter__()
    outcome: list[BaseException] = []

    def call() -> None:
        try:
            httpx.post(f"{fake.url}/chat/completions", json=CHAT, timeout=10)
        except httpx.HTTPError as exc:
            outcome.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    while not fake.requests:
        time.sleep(0.01)
    started = time.monotonic()
    fake.stop()
    caller.join(5)
    assert time.monotonic() - started < 3 and not caller.is_alive()


def test_standalone_process() -> None:
    process = subprocess.Popen([sys.executable, "-m", "router.testing", "--port", "0", "--chunks", "3"],
                               stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
        answer = httpx.post(f"{url}/chat/completions", json=CHAT, timeout=5).json()
        assert answer["choices"][0]["message"]["content"] == "tok0 tok1 tok2 "
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
        if process.stdout is not None:
            process.stdout.close()
