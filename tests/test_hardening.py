"""What an upstream sends back never carries a credential to the client, and what a client sends is
unambiguous before it reaches an upstream: real routers and scripted upstreams on 127.0.0.1."""

from __future__ import annotations

import base64
import gzip
import json
import logging
import re
import socket
import threading
import zlib
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.settings import Settings
from router.testing import Behavior, FakeUpstream
from tests.support import RouterServer, chat, make_settings

KEY = "sk-prov/a+b=c"
"""Provider A's key; the slash and plus give it distinct JSON-escaped and percent-encoded forms."""
HEADER_SECRET = "hdr-secret-0123456789"
"""Provider B's configured x-api-key header."""
URL_USER, URL_PASSWORD = "ray", "cluster-pass-42"
SECRETS = (KEY, HEADER_SECRET, URL_PASSWORD, base64.b64encode(f"{URL_USER}:{URL_PASSWORD}".encode()).decode())
JSON = {"content-type": "application/json"}
SSE = {"content-type": "text/event-stream"}


def _error_body(message: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": None}}).encode()


def _sse(*events: object, done: bytes = b"data: [DONE]\n\n", newline: bytes = b"\n") -> bytes:
    lines = b"".join(b"data: " + json.dumps(e).encode() + newline + newline for e in events)
    return lines + done


def _chunk(text: str) -> dict[str, Any]:
    return {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "x",
            "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}


def _settings(cluster: FakeUpstream, a: FakeUpstream, b: FakeUpstream, **model: Any) -> Settings:
    """Cluster behind URL credentials, provider `a` with a key, provider `b` with a secret header."""
    settings = make_settings(cluster, {"a": a, "b": b}, **model)
    cluster_url = cluster.url.replace("http://", f"http://{URL_USER}:{URL_PASSWORD}@")
    providers = {
        "a": settings.providers["a"].model_copy(update={"api_key_env": "PROV_A_KEY"}),
        "b": settings.providers["b"].model_copy(update={"headers": {"x-api-key": HEADER_SECRET}}),
    }
    return settings.model_copy(update={
        "cluster": settings.cluster.model_copy(update={"url": cluster_url}), "providers": providers})


@pytest.fixture
def stack(fakes, monkeypatch, caplog) -> Iterator[tuple[httpx.Client, FakeUpstream, FakeUpstream, FakeUpstream]]:
    monkeypatch.setenv("PROV_A_KEY", KEY)
    caplog.set_level(logging.DEBUG)
    cluster, a, b = fakes("cluster"), fakes("a"), fakes("b")
    with RouterServer(_settings(cluster, a, b, policy="provider_first")) as router, router.client() as client:
        yield client, cluster, a, b
    assert not any(secret in caplog.text for secret in SECRETS)


def _no_secret(r: httpx.Response) -> None:
    seen = r.content + str(r.headers).encode()
    for secret in SECRETS:
        for form in (secret, json.dumps(secret)[1:-1].replace("/", "\\/"), quote(secret, safe="")):
            assert form.encode() not in seen, form


def test_credentials_are_sent_to_their_upstream_only(stack):
    client, _cluster, a, b = stack
    a.script(Behavior(status=503))
    assert client.post("/v1/chat/completions", json=chat()).headers["x-openweight-upstream"] == "b"
    assert a.requests[0].headers["authorization"] == f"Bearer {KEY}"
    assert b.requests[0].headers["x-api-key"] == HEADER_SECRET and "authorization" not in b.requests[0].headers
    assert all(r.headers["accept-encoding"] == "identity" for r in (a.requests[0], b.requests[0]))


def test_a_gzip_error_echoing_the_key_reaches_the_client_decoded_and_without_it(stack):
    client, _, a, _ = stack
    for compress, coding in ((gzip.compress, "gzip"), (zlib.compress, "deflate")):
        echo = _error_body(f"bad request; you sent Authorization: Bearer {KEY}")
        a.script(Behavior(status=400, body=compress(echo), headers={"content-encoding": coding}))
        r = client.post("/v1/chat/completions", json=chat())
        assert r.status_code == 400 and "content-encoding" not in r.headers
        assert r.json()["error"]["message"] == "bad request; you sent Authorization: Bearer <redacted>"
        _no_secret(r)


def test_every_credential_in_every_form_is_scrubbed_from_bodies_and_streams(stack):
    client, cluster, a, b = stack
    escaped = KEY.replace("/", "\\/").encode()  # as an encoder that escapes slashes writes it
    percent = KEY.replace("/", "%2f").replace("+", "%2b").replace("=", "%3d").encode()
    a.script(Behavior(status=422, body=b'{"error": {"message": "' + escaped + b" " + percent + b'", "type": "x"}}'))
    r = client.post("/v1/chat/completions", json=chat())
    assert r.status_code == 422 and r.json()["error"]["message"] == "<redacted> <redacted>"
    _no_secret(r)
    a.script(Behavior(status=503))
    b.script(Behavior(status=400, body=_error_body(f"you sent x-api-key: {HEADER_SECRET}")))
    r = client.post("/v1/chat/completions", json=chat())
    assert r.status_code == 400 and r.json()["error"]["message"] == "you sent x-api-key: <redacted>"
    _no_secret(r)
    # A successful answer and a stream's events that echo the key are scrubbed too.
    a.script(Behavior(body=json.dumps({"object": "chat.completion", "choices": [], "echo": KEY}).encode()))
    r = client.post("/v1/chat/completions", json=chat())
    assert r.status_code == 200 and r.json()["echo"] == "<redacted>"
    a.script(Behavior(body=_sse(_chunk("a"), _chunk(f"Bearer {KEY}")), headers=SSE))
    r = client.post("/v1/chat/completions", json=chat(stream=True))
    assert r.status_code == 200 and "Bearer <redacted>" in r.text and "stream_interrupted" not in r.text
    _no_secret(r)
    # The cluster's URL credentials, sent as Basic authorization, likewise.
    basic = base64.b64encode(f"{URL_USER}:{URL_PASSWORD}".encode()).decode()
    a.script(Behavior(status=503))
    b.script(Behavior(status=503))
    cluster.script(Behavior(status=400, body=_error_body(f"Basic {basic} from {URL_USER}:{URL_PASSWORD}")))
    r = client.post("/v1/chat/completions", json=chat())
    assert r.headers["x-openweight-upstream"] == "cluster"
    assert cluster.requests[0].headers["authorization"] == f"Basic {basic}"
    assert r.json()["error"]["message"].startswith("Basic <redacted>")  # a base64 text's last characters may stay
    assert r.json()["error"]["message"].endswith(" from <redacted>")
    _no_secret(r)


def test_upstream_headers_are_relayed_only_when_checked(stack):
    client, _, a, _b = stack
    a.script(Behavior(headers={"content-type": f'application/json; key="{KEY}"',
                               "x-leak": KEY, "set-cookie": f"k={KEY}", "content-encoding": "identity"}))
    r = client.post("/v1/chat/completions", json=chat())
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert "x-leak" not in r.headers and "set-cookie" not in r.headers
    a.script(Behavior(headers={"content-type": f"application/json; x={KEY[:6]}"}))
    assert client.post("/v1/chat/completions", json=chat()).headers["content-type"] == f"application/json; x={KEY[:6]}"
    a.script(Behavior(headers={"content-type": "text/html, x=<script>"}))  # not a media type: not relayed
    assert client.post("/v1/chat/completions", json=chat()).headers["content-type"] == "application/json"
    _no_secret(r)


def test_an_answer_the_router_cannot_decode_is_never_relayed(stack):
    client, _, a, _b = stack
    for coding in ("compress", "gzip, gzip", "x-custom"):
        a.script(Behavior(status=400, body=_error_body(f"key {KEY}"), headers={"content-encoding": coding}))
        r = client.post("/v1/chat/completions", json=chat())
        assert r.status_code == 200 and r.headers["x-openweight-upstream"] == "b"  # a protocol error: fell back
        _no_secret(r)


def test_a_gzip_stream_is_decoded_and_relayed_event_by_event(stack):
    client, _, a, _ = stack
    a.script(Behavior(body=gzip.compress(_sse(_chunk("hello "), _chunk("world"))),
                      headers={**SSE, "content-encoding": "gzip"}))
    r = client.post("/v1/chat/completions", json=chat(stream=True))
    assert r.status_code == 200 and "content-encoding" not in r.headers
    assert '"hello "' in r.text and '"world"' in r.text and r.text.endswith("data: [DONE]\n\n")
    assert "stream_interrupted" not in r.text


@pytest.mark.parametrize("done", [b"data: [DONE]", b"data: [DONE]\n", b"data:[DONE]\r"])
def test_a_final_done_without_its_blank_line_ends_the_stream(stack, done):
    client, _, a, _ = stack
    a.script(Behavior(body=_sse(_chunk("x"), done=done), headers=SSE))
    r = client.post("/v1/chat/completions", json=chat(stream=True))
    assert "stream_interrupted" not in r.text and r.text.endswith("[DONE]\n\n")


def test_bare_cr_line_ends_lose_no_content(stack):
    client, _, a, _ = stack
    a.script(Behavior(body=_sse(_chunk("one"), _chunk("two"), done=b"data: [DONE]\r\r", newline=b"\r"), headers=SSE))
    r = client.post("/v1/chat/completions", json=chat(stream=True))
    events = [line for line in r.text.split("\n") if line.startswith("data: {")]
    assert [json.loads(e[6:])["choices"][0]["delta"]["content"] for e in events] == ["one", "two"]
    assert "stream_interrupted" not in r.text


@pytest.mark.parametrize("body, key", [
    (b'{"model": "gpt-4o-expensive", "model": "m1", "messages": []}', "model"),
    (b'{"model": "m1", "stream": false, "messages": [], "stream": true}', "stream"),
    (b'{"model": "m1", "stream": true, "stream_options": {}, "stream_options": {"include_usage": true}}',
     "stream_options"),
    (b'{"model": "m1", "stream": true, "stream_options": {"include_usage": true, "include_usage": false}}',
     "stream_options.include_usage"),
    (b'{"model": "m1", "max_tokens": 1, "messages": [], "max_tokens": 100000}', "max_tokens"),
])
def test_a_body_with_a_key_twice_reaches_no_upstream(stack, body, key):
    client, cluster, a, b = stack
    r = client.post("/v1/chat/completions", content=body, headers=JSON)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert repr(key) in r.json()["error"]["message"] and r.json()["error"]["param"] == key
    assert cluster.requests == a.requests == b.requests == []


@pytest.mark.parametrize("value", [b"NaN", b"Infinity", b"-Infinity", b"[1, NaN]", b'{"t": -Infinity}'])
def test_non_finite_numbers_are_not_json(stack, value):
    client, _cluster, a, b = stack
    r = client.post("/v1/chat/completions", content=b'{"model": "m1", "temperature": ' + value + b"}", headers=JSON)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    assert a.requests == b.requests == []


def test_a_lone_surrogate_anywhere_is_forwarded_escaped_never_a_500(stack):
    client, _, a, _ = stack
    for body in (b'{"model": "m1", "stream": true, "stream_options": {"x": "\\ud800"}}',
                 b'{"model": "m1", "stream": true, "stream_options": {"\\udfff": 1}}',
                 b'{"\\ud800": "\\udc00\\ud800", "model": "m1", "stream": true}'):
        r = client.post("/v1/chat/completions", content=body, headers=JSON)
        assert r.status_code == 200, r.text
        sent = a.requests[-1].raw
        assert json.loads(sent)["model"] == "a-model" and b"\\ud" in sent


_secret_echo = st.sampled_from([KEY, json.dumps(KEY)[1:-1].replace("/", "\\/"), f"Bearer {KEY}", "plain text"])


def test_generated_upstream_answers_never_leak_or_give_a_server_error(fakes, monkeypatch):
    monkeypatch.setenv("PROV_A_KEY", KEY)
    cluster, a, b = fakes("cluster"), fakes("a"), fakes("b", default=Behavior(status=503))
    with RouterServer(_settings(cluster, a, b, policy="provider_only")) as router, router.client() as client:

        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
        @given(status=st.sampled_from([200, 400, 404, 422, 500]), echo=_secret_echo,
               coding=st.sampled_from(["", "identity", "gzip", "deflate", "br", "gzip, deflate", "bogus"]),
               event_stream=st.booleans(), corrupt=st.booleans())
        def check(status: int, echo: str, coding: str, event_stream: bool, corrupt: bool) -> None:
            raw = _sse(_chunk(echo)) if event_stream else _error_body(echo)
            body = {"gzip": gzip.compress, "deflate": zlib.compress}.get(coding, lambda x: x)(raw)
            if corrupt:
                body = body[: len(body) // 2]
            headers = {**(SSE if event_stream else JSON), **({"content-encoding": coding} if coding else {})}
            a.script(Behavior(status=status, body=body, headers=headers))
            r = client.post("/v1/chat/completions", json=chat(stream=event_stream))
            assert r.status_code != 500, r.text
            if r.status_code > 500:  # the router's own answer (a client error is relayed as the upstream sent it)
                assert set(r.json()["error"]) == {"message", "type", "param", "code"}
            _no_secret(r)

        check()


class RawUpstream:
    """An upstream on 127.0.0.1 that answers every request with scripted raw bytes, then closes:
    what no HTTP server library would send (odd codings, repeated headers, 1xx statuses)."""

    def __init__(self) -> None:
        self.answers: list[bytes] = []
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self._sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}/v1"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                head = b""
                while b"\r\n\r\n" not in head:
                    head += conn.recv(65536)
                length = int(re.search(rb"content-length: *(\d+)", head, re.I).group(1))  # type: ignore[union-attr]
                body = head.partition(b"\r\n\r\n")[2]
                while len(body) < length:
                    body += conn.recv(65536)
                conn.sendall(self.answers.pop(0) if self.answers else b"HTTP/1.1 500 x\r\ncontent-length: 0\r\n\r\n")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()


def _raw_answer(status: bytes, headers: list[bytes], body: bytes) -> bytes:
    head = [b"HTTP/1.1 " + status, *headers, b"content-length: %d" % len(body), b"connection: close"]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


@pytest.fixture
def raw(fakes, monkeypatch) -> Iterator[tuple[httpx.Client, RawUpstream, FakeUpstream]]:
    """Provider `a` (with the key) answers raw bytes; provider `b` is a well-behaved fallback."""
    monkeypatch.setenv("PROV_A_KEY", KEY)
    a, b = RawUpstream(), fakes("b")
    settings = make_settings(None, {"a": a.url, "b": b}, policy="provider_only",
                             router={"retry": {"max_attempts": 1}})
    providers = {**settings.providers, "a": settings.providers["a"].model_copy(
        update={"api_key_env": "PROV_A_KEY", "max_response_bytes": 1 << 20})}
    try:
        with RouterServer(settings.model_copy(update={"providers": providers})) as router, router.client() as c:
            yield c, a, b
    finally:
        a.close()


_ECHO = _error_body(f"bad key {KEY}")


@pytest.mark.parametrize("headers, body", [
    ([b"content-encoding: gzip", b"content-encoding: identity"], gzip.compress(_ECHO)),
    ([b"content-encoding: gzip\x0b"], gzip.compress(_ECHO)),
    ([b"content-encoding: gzip"], gzip.compress(gzip.compress(_ECHO))),
    ([b"content-encoding: gzip"], gzip.compress(_ECHO)[:-12]),
    ([b"content-encoding: gzip"], gzip.compress(_ECHO) + b"junk"),
    ([b"content-encoding: br"], _ECHO),
    ([b"content-type: application/json"], gzip.compress(_ECHO)),  # gzip bytes labelled plain: relayed, no key
    ([b"content-encoding: gzip"], gzip.compress(b"x" * (2 << 20))),  # inflates past max_response_bytes
], ids=["two-codings", "vertical-tab", "gzip-twice", "cut-short", "trailing-bytes", "br", "unlabelled", "bomb"])
def test_an_answer_the_router_cannot_read_as_every_client_would_is_never_relayed(raw, headers, body):
    client, a, _ = raw
    a.answers.append(_raw_answer(b"400 Bad Request", headers, body))
    r = client.post("/v1/chat/completions", json=chat())
    # Refused before it is committed (the request goes on to `b`), or once read (the router's own 502).
    assert (r.status_code, r.headers.get("x-openweight-upstream")) in ((200, "b"), (502, None)), r.text
    assert not r.content.startswith(b"\x1f\x8b")
    _no_secret(r)


def test_a_transfer_coding_other_than_chunked_and_a_1xx_answer_fall_back(raw):
    client, a, _ = raw
    gz = gzip.compress(_ECHO)
    a.answers.append(b"HTTP/1.1 400 Bad Request\r\ntransfer-encoding: gzip, chunked\r\nconnection: close\r\n\r\n"
                     + b"%x\r\n" % len(gz) + gz + b"\r\n0\r\n\r\n")
    a.answers.append(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: h2c\r\nconnection: upgrade\r\n\r\n")
    for _ in range(2):
        r = client.post("/v1/chat/completions", json=chat())
        assert r.status_code == 200 and r.headers["x-openweight-upstream"] == "b"


def test_a_stream_ending_in_bare_crs_and_an_endless_event_leak_nothing(raw):
    client, a, _ = raw
    sse = [b"content-type: text/event-stream"]
    a.answers.append(_raw_answer(b"200 OK", sse, b'data: {"choices": [], "echo": "' + KEY.encode() + b'"}\r\r'))
    a.answers.append(_raw_answer(b"200 OK", sse, b'data: {"x": "' + b"y" * (5 << 20) + b'"}'))
    r = client.post("/v1/chat/completions", json=chat(stream=True))
    assert '"echo": "<redacted>"' in r.text
    _no_secret(r)
    r = client.post("/v1/chat/completions", json=chat(stream=True))
    assert "more than 4194304 bytes" in r.text and "stream_interrupted" in r.text


def test_every_encoded_form_of_a_credential_is_scrubbed_and_plain_headers_are_not(fakes, monkeypatch):
    monkeypatch.setenv("PROV_A_KEY", KEY)
    a = fakes("a")
    settings = make_settings(None, {"a": a}, policy="provider_only")
    headers = {"anthropic-version": "2023-06-01", "Authorization": "Bearer tok-abcdef12"}
    providers = {"a": settings.providers["a"].model_copy(update={"api_key_env": "PROV_A_KEY", "headers": headers})}
    forms = ["".join(f"\\u{ord(c):04X}" for c in KEY), "".join(f"%{ord(c):02x}" for c in KEY),
             quote(KEY), base64.b64encode(f"Bearer {KEY}".encode()).decode(), "tok-abcdef12"]
    with RouterServer(settings.model_copy(update={"providers": providers})) as router, router.client() as client:
        for form in forms:
            a.script(Behavior(status=400, body=b'{"error": {"message": "' + form.encode() + b' on 2023-06-01"}}'))
            r = client.post("/v1/chat/completions", json=chat())
            assert r.status_code == 400 and "<redacted>" in r.text and "2023-06-01" in r.text, form
            assert form not in r.text
            _no_secret(r)
