"""A scripted fake OpenAI-compatible server, for tests and the benchmark.

It stands in for external providers and, in router tests, for the cluster: a pure ASGI app served
by uvicorn on 127.0.0.1, in a background thread with its own event loop::

    with FakeUpstream("cluster") as fake:
        fake.script(Behavior(status=503, headers={"retry-after": "1"}), Behavior(cut_after=2))
        ...  # the first inference request gets a 503, the second a stream cut after two chunks
        assert fake.requests[0].body["model"] == "m"

Every answer looks like OpenAI's, streams included (one ASGI body message per SSE event, so
delivery is incremental). ``python -m router.testing --port N`` runs it in the foreground.
"""

from router.testing.fake import PROMPT_TOKENS, Behavior, FakeUpstream, Received

__all__ = ["PROMPT_TOKENS", "Behavior", "FakeUpstream", "Received"]
