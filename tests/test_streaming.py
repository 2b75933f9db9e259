"""Streams through a real router: incremental relay, usage, breaks, client disconnects."""

from __future__ import annotations

import json
import socket

from router.testing import Behavior
from tests.support import RouterServer, chat, make_settings


def events(text: str) -> list[str]:
    return [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]


def test_chunks_arrive_before_the_upstream_finishes(fakes):
    cluster = fakes("cluster", default=Behavior(chunks=4, chunk_delay_s=0.3))
    with (
        RouterServer(make_settings(cluster)) as router,
        router.client() as client,
        client.stream("POST", "/v1/chat/completions", json=chat(stream=True)) as r,
    ):
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["choices"][0]["delta"]["content"] == "tok0 "
        assert not cluster.requests[0].completed
        rest = list(lines)
    assert cluster.requests[0].completed
    assert rest[-2:] == ["data: [DONE]", ""] or rest[-1] == "data: [DONE]"
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["x-openweight-upstream"] == "cluster"


def test_usage_chunk_is_requested_counted_and_stripped_when_not_asked_for(fakes):
    cluster = fakes("cluster", default=Behavior(chunks=3))
    with RouterServer(make_settings(cluster)) as router, router.client() as client:
        r = client.post("/v1/chat/completions", json=chat(stream=True))
        assert cluster.requests[0].body["stream_options"] == {"include_usage": True}
        assert all(json.loads(e)["choices"] for e in events(r.text)[:-1])
        assert router.metric("openweight_tokens_total", upstream="cluster", kind="completion") == 3
        assert router.metric("openweight_tokens_total", upstream="cluster", kind="prompt") == 7

        r = client.post("/v1/chat/completions", json=chat(stream=True, stream_options={"include_usage": True}))
        last = json.loads(events(r.text)[-2])
        assert last["choices"] == [] and last["usage"]["completion_tokens"] == 3
        assert router.metric("openweight_tokens_total", upstream="cluster", kind="completion") == 6


def test_a_cut_stream_ends_with_an_error_event_and_done(fakes):
    cluster = fakes("cluster", default=Behavior(chunks=5, cut_after=2))
    with RouterServer(make_settings(cluster, router={"max_resumes": 0})) as router, router.client() as client:
        r = client.post("/v1/chat/completions", json=chat(stream=True))
        data = events(r.text)
        assert r.status_code == 200
        assert [json.loads(e)["choices"][0]["delta"]["content"] for e in data[:2]] == ["tok0 ", "tok1 "]
        assert json.loads(data[2])["error"]["code"] == "stream_interrupted"
        assert data[3] == "[DONE]" and len(data) == 4
        assert router.metric("openweight_stream_errors_total", upstream="cluster") == 1


def test_a_stream_without_done_is_a_failure_not_a_silent_end(fakes):
    cluster = fakes("cluster", default=Behavior(chunks=2, omit_done=True))
    with RouterServer(make_settings(cluster)) as router, router.client() as client:
        data = events(client.post("/v1/chat/completions", json=chat(stream=True)).text)
        assert "without [DONE]" in json.loads(data[-2])["error"]["message"]
        assert data[-1] == "[DONE]"
        assert router.metric("openweight_stream_errors_total", upstream="cluster") == 1


def test_a_break_after_the_first_byte_never_falls_back(fakes):
    cluster = fakes("cluster", default=Behavior(chunks=5, cut_after=1))
    prov = fakes("prov")
    with RouterServer(make_settings(cluster, {"prov": prov})) as router, router.client() as client:
        r = client.post("/v1/chat/completions", json=chat(stream=True))
    assert r.headers["x-openweight-upstream"] == "cluster"
    assert "stream_interrupted" in r.text
    assert prov.requests == []


def test_a_stream_fails_over_before_its_first_byte(fakes):
    cluster, prov = fakes("cluster", default=Behavior(status=503)), fakes("prov")
    with RouterServer(make_settings(cluster, {"prov": prov})) as router, router.client() as client:
        r = client.post("/v1/completions", json={"model": "m1", "prompt": "x", "stream": True})
    assert r.headers["x-openweight-upstream"] == "prov"
    assert events(r.text)[-1] == "[DONE]"
    assert "error" not in r.text


def _raw_request(port: int, body: dict[str, object]) -> socket.socket:
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        + f"content-length: {len(payload)}\r\n\r\n".encode() + payload
    )
    return sock


def test_client_disconnect_mid_stream_closes_the_upstream_request(fakes):
    cluster = fakes("cluster", default=Behavior(chunks=50, chunk_delay_s=0.1))
    with RouterServer(make_settings(cluster)) as router:
        sock = _raw_request(router.port, chat(stream=True))
        assert b"tok0" in sock.recv(65536) or b"tok0" in sock.recv(65536)
        sock.close()
        assert cluster.wait_for_disconnect(5)
        assert not cluster.requests[0].completed
        assert router.metric("openweight_requests_total", status="499") == 1
        assert router.metric("openweight_in_flight_requests", model="m1") == 0


def test_client_disconnect_while_waiting_for_the_first_byte_closes_the_upstream(fakes):
    cluster = fakes("cluster", default=Behavior(hang=True))
    settings = make_settings(cluster, cluster_extra={"first_byte_timeout_s": 30})
    with RouterServer(settings) as router:
        sock = _raw_request(router.port, chat())
        assert not cluster.wait_for_disconnect(0.3)
        sock.close()
        assert cluster.wait_for_disconnect(5)
