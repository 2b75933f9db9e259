"""The official `openai` client works against the router unchanged: sync, async and streaming."""

from __future__ import annotations

import asyncio

import openai
import pytest

from router.testing import Behavior
from tests.support import MODEL, RouterServer, make_settings

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def router(fakes):
    cluster = fakes("cluster", default=Behavior(status=503))  # every answer comes through a fallback
    prov = fakes("prov", default=Behavior(chunks=4))
    with RouterServer(make_settings(cluster, {"prov": prov})) as server:
        yield server


def test_sync_client(router):
    client = openai.OpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES)
    assert raw.headers["x-openweight-upstream"] == "prov"
    completion = raw.parse()
    assert completion.choices[0].message.content == "tok0 tok1 tok2 tok3 "
    assert completion.usage is not None and completion.usage.completion_tokens == 4
    text = client.completions.create(model=MODEL, prompt="Paris is")
    assert text.choices[0].text.startswith("tok0")
    vectors = client.embeddings.create(model=MODEL, input=["a", "b"])
    assert len(vectors.data) == 2
    assert [m.id for m in client.models.list()] == [MODEL]


def test_sync_streaming(router):
    client = openai.OpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "tok0 tok1 tok2 tok3 "
    assert all(c.usage is None for c in chunks)

    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    usage = [c.usage for c in stream if c.usage is not None]
    assert len(usage) == 1 and usage[0].completion_tokens == 4


def test_async_client_and_stream(router):
    async def main() -> tuple[str, str]:
        async with openai.AsyncOpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0) as client:
            completion = await client.chat.completions.create(model=MODEL, messages=MESSAGES)
            stream = await client.completions.create(model=MODEL, prompt="x", stream=True)
            text = "".join([c.choices[0].text async for c in stream if c.choices])
            return completion.choices[0].message.content or "", text

    content, streamed = asyncio.run(main())
    assert content == streamed == "tok0 tok1 tok2 tok3 "


def test_errors_surface_as_openai_exceptions(router):
    client = openai.OpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="missing", messages=MESSAGES)
    assert caught.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, extra_body={"stream": "maybe"})
