"""Streams that survive: a stream broken after its first byte continues on the next upstream, and
the client reads one stream. Real routers and scripted upstreams on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import openai
import pytest

from router.settings import Settings
from router.testing import PROMPT_TOKENS, Behavior, FakeUpstream
from tests.support import MODEL, RouterServer, chat, make_settings

SSE = {"content-type": "text/event-stream"}


def events(text: str) -> list[Any]:
    return [line[6:] if line[6:] == "[DONE]" else json.loads(line[6:])
            for line in text.splitlines() if line.startswith("data: ")]


def text_of(data: list[Any]) -> str:
    parts = []
    for event in data:
        for choice in event["choices"] if isinstance(event, dict) else ():
            parts.append(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
    return "".join(parts)


def with_backup(cluster: FakeUpstream, backup: FakeUpstream, continuation: str = "trailing_assistant",
                **model: Any) -> Settings:
    settings = make_settings(cluster, {"backup": backup}, **model)
    providers = {"backup": settings.providers["backup"].model_copy(update={"continuation": continuation})}
    return settings.model_copy(update={"providers": providers})


def _raw_stream(*events: object, done: bool = False) -> Behavior:
    body = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
    return Behavior(body=body + (b"data: [DONE]\n\n" if done else b""), headers=SSE)


def _chunk(delta: dict[str, Any]) -> dict[str, Any]:
    return {"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "c",
            "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}


def test_a_cut_chat_stream_and_completion_continue_on_the_provider(fakes):
    cluster, backup = fakes("cluster", default=Behavior(chunks=6, cut_after=3)), fakes("backup")
    with RouterServer(with_backup(cluster, backup)) as router, router.client() as client:
        r = client.post("/v1/chat/completions", json=chat(stream=True, max_tokens=50))
        data = events(r.text)
        assert "error" not in r.text and data[-1] == "[DONE]"
        assert text_of(data) == "tok0 tok1 tok2 " + "tok0 tok1 tok2 tok3 tok4 "
        assert {e["id"] for e in data[:-1]} == {data[0]["id"]} and {e["model"] for e in data[:-1]} == {"m1"}
        assert sum("role" in e["choices"][0]["delta"] for e in data[:-1] if e["choices"]) == 1
        sent = backup.requests[0].body
        assert sent == {"model": "backup-model", "stream": True, "max_tokens": 47,
                        "stream_options": {"include_usage": True},
                        "messages": [{"role": "user", "content": "hi"},
                                     {"role": "assistant", "content": "tok0 tok1 tok2 "}]}

        r = client.post("/v1/completions", json={"model": MODEL, "prompt": "Once", "stream": True, "max_tokens": 9})
        assert "error" not in r.text and events(r.text)[-1] == "[DONE]"
        assert text_of(events(r.text)) == "tok0 tok1 tok2 tok0 tok1 tok2 tok3 tok4 "
        sent = backup.requests[1].body
        assert sent["prompt"] == "Oncetok0 tok1 tok2 " and sent["max_tokens"] == 6
        assert router.metric("openweight_stream_resumes_total", from_upstream="cluster", to_upstream="backup",
                             outcome="success") == 2
        assert router.metric("openweight_stream_resume_gap_seconds_count") == 2
        assert router.metric("openweight_stream_errors_total") == 0
        assert router.metric("openweight_tokens_total", upstream="cluster", kind="completion") == 6  # estimated
        assert router.metric("openweight_tokens_total", upstream="backup", kind="completion") == 10


@pytest.mark.parametrize("break_", ["cut", "error_event", "no_done", "read_timeout"])
@pytest.mark.parametrize("usage", [False, True])
def test_every_kind_of_break_is_continued_and_usage_sums_both_parts(fakes, break_, usage):
    behavior = {
        "cut": Behavior(chunks=6, cut_after=2),
        "error_event": Behavior(chunks=6, error_after=2),
        "no_done": _raw_stream(_chunk({"role": "assistant", "content": "tok0 "}), _chunk({"content": "tok1 "})),
        "read_timeout": Behavior(chunks=6, stall_after=2),
    }[break_]
    cluster, backup = fakes("cluster", default=behavior), fakes("backup")
    settings = with_backup(cluster, backup, cluster_extra={"read_timeout_s": 0.5})
    options = {"stream_options": {"include_usage": True}} if usage else {}
    with RouterServer(settings) as router, router.client() as client:
        r = client.post("/v1/chat/completions", json=chat(stream=True, **options))
    data = events(r.text)
    assert "error" not in r.text and data[-1] == "[DONE]"
    assert text_of(data) == "tok0 tok1 " + "tok0 tok1 tok2 tok3 tok4 "
    assert backup.requests[0].body["messages"][-1] == {"role": "assistant", "content": "tok0 tok1 "}
    if usage:
        assert data[-2]["usage"] == {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": 2 + 5,
                                     "total_tokens": PROMPT_TOKENS + 7}
    else:
        assert all(e["choices"] for e in data[:-1])


def test_continuation_forms_for_the_cluster_and_each_provider_kind(fakes):
    # A self-hosted-only model continues on the cluster again (Ray Serve picks another replica).
    cluster = fakes("cluster")
    cluster.script(Behavior(chunks=4, cut_after=1))
    with RouterServer(make_settings(cluster, policy="self_hosted_only")) as router, router.client() as client:
        r = client.post("/v1/chat/completions", json=chat(stream=True, max_completion_tokens=10, stop=["x"],
                                                           temperature=0))
    assert "error" not in r.text and text_of(events(r.text)) == "tok0 tok0 tok1 tok2 tok3 tok4 "
    assert cluster.requests[1].body == {
        "model": "m1", "stream": True, "max_completion_tokens": 9, "stop": ["x"], "temperature": 0,
        "stream_options": {"include_usage": True}, "continue_final_message": True, "add_generation_prompt": False,
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "tok0 "}]}
    for continuation, extra in (("prefix", {"prefix": True}), ("continue_final_message", {})):
        cluster, backup = fakes("cluster", default=Behavior(chunks=4, cut_after=1)), fakes("backup")
        with RouterServer(with_backup(cluster, backup, continuation)) as router, router.client() as client:
            client.post("/v1/chat/completions", json=chat(stream=True))
        sent = backup.requests[0].body
        assert sent["messages"][-1] == {"role": "assistant", "content": "tok0 ", **extra}
        assert ("continue_final_message" in sent) == (continuation == "continue_final_message")


@pytest.mark.parametrize("body, first", [
    (chat(stream=True, n=2), None),
    (chat(stream=True, logprobs=True), None),
    (chat(stream=True), _raw_stream(_chunk({"role": "assistant", "tool_calls": [
        {"index": 0, "id": "t", "type": "function", "function": {"name": "f", "arguments": ""}}]}))),
])
def test_streams_that_may_not_be_continued_end_with_the_error_event(fakes, body, first):
    cluster, backup = fakes("cluster", default=first or Behavior(chunks=4, cut_after=1)), fakes("backup")
    with RouterServer(with_backup(cluster, backup)) as router, router.client() as client:
        r = client.post("/v1/chat/completions", json=body)
    assert events(r.text)[-2]["error"]["code"] == "stream_interrupted" and events(r.text)[-1] == "[DONE]"
    assert backup.requests == [] and len(cluster.requests) == 1


def test_a_provider_that_cannot_continue_is_never_asked_and_resumes_are_bounded(fakes):
    cluster, backup = fakes("cluster", default=Behavior(chunks=4, cut_after=1)), fakes("backup")
    with RouterServer(with_backup(cluster, backup, "none")) as router, router.client() as client:
        r = client.post("/v1/chat/completions", json=chat(stream=True))
        assert "continued 2 times already" in events(r.text)[-2]["error"]["message"]
        assert backup.requests == [] and len(cluster.requests) == 3  # the cluster again, twice
        assert router.metric("openweight_stream_errors_total", upstream="cluster") == 1
    backup = fakes("backup", default=Behavior(chunks=4, cut_after=1))
    settings = with_backup(cluster, backup, router={"max_resumes": 1})
    with RouterServer(settings) as router, router.client() as client:
        r = client.post("/v1/chat/completions", json=chat(stream=True))
        assert "continued 1 times already" in events(r.text)[-2]["error"]["message"]
        assert len(backup.requests) == 1


def test_a_continuation_that_no_upstream_takes_ends_with_the_error_event(fakes):
    cluster, backup = fakes("cluster", default=Behavior(chunks=4, cut_after=1)), fakes("backup")
    backup.default = Behavior(status=400)
    with RouterServer(with_backup(cluster, backup, policy="self_hosted_first")) as router, router.client() as c:
        r = c.post("/v1/chat/completions", json=chat(stream=True))
        message = events(r.text)[-2]["error"]["message"]
        assert "no upstream could continue it" in message
        assert router.metric("openweight_stream_resumes_total", outcome="failed", to_upstream="none") == 1


def test_the_openai_client_reads_one_uninterrupted_stream(fakes):
    cluster, backup = fakes("cluster", default=Behavior(chunks=6, cut_after=3)), fakes("backup")
    with RouterServer(with_backup(cluster, backup)) as router:
        client = openai.OpenAI(base_url=router.url + "/v1", api_key="x", max_retries=0)
        chunks = list(client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == "tok0 tok1 tok2 tok0 tok1 tok2 tok3 tok4 "

        async def read() -> str:
            async with openai.AsyncOpenAI(base_url=router.url + "/v1", api_key="x", max_retries=0) as aclient:
                stream = await aclient.completions.create(model=MODEL, prompt="p", stream=True)
                return "".join([c.choices[0].text async for c in stream])

        assert asyncio.run(read()) == "tok0 tok1 tok2 tok0 tok1 tok2 tok3 tok4 "
