"""The edge of a real router: authentication, rate limits, and every kind of bad input."""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.auth import KeyStore, is_loopback
from router.settings import ApiKey, ConfigError, RateLimit
from router.testing import Behavior, FakeUpstream
from tests.support import MODEL, RouterServer, chat, make_settings

KEY = "ow-test-key-1"
OTHER = "ow-test-key-2"


@pytest.fixture
def keyed(fakes):
    cluster = fakes("cluster")
    keys = KeyStore([
        ApiKey(name="alice", sha256=hashlib.sha256(KEY.encode()).hexdigest()),
        ApiKey(name="bob", key=OTHER, models=["other"], rate_limit=RateLimit(requests_per_minute=60, burst=2)),
    ])
    settings = make_settings(cluster)
    settings = settings.model_copy(update={"models": {**settings.models, "other": settings.models[MODEL]}})
    with RouterServer(settings, keys) as router, router.client() as client:
        yield client, cluster


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer  x y", "Basic dXNlcjpwYXNz", f"Token {KEY}", "Bearer wrong", f"Bearer {KEY}x"],
)
def test_requests_without_a_valid_key_are_refused(keyed, authorization):
    client, cluster = keyed
    headers = {} if authorization is None else {"authorization": authorization}
    r = client.post("/v1/chat/completions", json=chat(), headers=headers)
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "authentication_error"
    assert client.get("/v1/models", headers=headers).status_code == 401
    assert cluster.requests == []


def test_a_valid_key_is_served_and_probes_need_none(keyed):
    client, _ = keyed
    r = client.post("/v1/chat/completions", json=chat(), headers={"authorization": f"Bearer {KEY}"})
    assert r.status_code == 200
    for path in ("/healthz", "/readyz", "/metrics"):
        assert client.get(path).status_code == 200


def test_per_key_models_and_rate(keyed):
    client, _ = keyed
    bob = {"authorization": f"Bearer {OTHER}"}
    r = client.post("/v1/chat/completions", json=chat(), headers=bob)
    assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed"
    assert [m["id"] for m in client.get("/v1/models", headers=bob).json()["data"]] == ["other"]
    statuses = [
        client.post("/v1/chat/completions", json=chat(model="other"), headers=bob).status_code for _ in range(2)
    ]
    assert statuses == [200, 429]
    limited = client.post("/v1/chat/completions", json=chat(model="other"), headers=bob)
    assert limited.json()["error"]["type"] == "rate_limit_error"
    assert 1 <= int(limited.headers["retry-after"]) <= 2
    time.sleep(1.1)
    assert client.post("/v1/chat/completions", json=chat(model="other"), headers=bob).status_code == 200


def test_keys_from_env_and_file(tmp_path, monkeypatch):
    digest = hashlib.sha256(b"from-file").hexdigest()
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(f"- name: svc\n  sha256: {digest}\n  models: [m1]\n")
    monkeypatch.setenv("OW_KEYS", "from-env-1, from-env-2")
    from router.settings import AuthConfig

    store = KeyStore.from_config(AuthConfig(keys_file=keys_file, keys_env="OW_KEYS"))
    assert store.authenticate("Bearer from-file").models == frozenset({"m1"})
    assert store.authenticate("Bearer from-env-2").name == "OW_KEYS[1]"
    keys_file.write_text("- name: svc\n  sha256: nothex\n")
    with pytest.raises(Exception, match=r"router.auth.keys_file\[0\]"):
        KeyStore.from_config(AuthConfig(keys_file=keys_file, keys_env="OW_KEYS"))
    keys_file.write_text("- name: svc\n  key: sk-\u00fcn\u00ef\n")  # a header could never carry it
    with pytest.raises(ConfigError, match=r"keys_file\[0\]: .*printable ASCII"):
        KeyStore.from_config(AuthConfig(keys_file=keys_file, keys_env="OW_KEYS"))
    keys_file.unlink()
    monkeypatch.setenv("OW_KEYS", "fine, caf\u00e9")
    with pytest.raises(ConfigError, match=r"OW_KEYS\[1\]: .*printable ASCII"):
        KeyStore.from_config(AuthConfig(keys_env="OW_KEYS"))


def test_open_router_refuses_a_non_loopback_address_without_keys(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("models: {m1: {}}\n")
    done = subprocess.run(
        [sys.executable, "-m", "router.cli", "router", "--config", str(config), "--host", "0.0.0.0"],
        capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 2
    assert "--insecure-no-auth" in done.stderr
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1")


def _error(r: httpx.Response, status: int) -> dict[str, object]:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    return error  # type: ignore[no-any-return]


@pytest.fixture
def open_router(fakes):
    cluster = fakes("cluster")
    with RouterServer(make_settings(cluster, router={"max_body_bytes": 2048})) as router, router.client() as c:
        yield c, cluster


def test_bad_bodies(open_router):
    client, cluster = open_router
    post = lambda content, **kw: client.post("/v1/chat/completions", content=content, **kw)  # noqa: E731
    json_type = {"content-type": "application/json"}
    assert "not valid JSON" in str(_error(post(b"{nope", headers=json_type), 400)["message"])
    assert "UTF-8" in str(_error(post(b'{"model": "\xff"}', headers=json_type), 400)["message"])
    _error(post(b"", headers=json_type), 400)
    _error(post(b"[1, 2]", headers=json_type), 400)
    for trailing_comma in (b'{"model": "m1",}', b'{"model": "m1", }', b'{"model": "m1",\n}'):
        assert "not valid JSON" in str(_error(post(trailing_comma, headers=json_type), 400)["message"])
    assert "nested too deeply" in str(_error(post(b"[" * 1000 + b"]" * 1000, headers=json_type), 400)["message"])
    nested = b'{"model": "m1", "x": ' + b"[" * 1000 + b"]" * 1000 + b"}"
    assert "nested too deeply" in str(_error(post(nested, headers=json_type), 400)["message"])
    assert _error(post(b'{"messages": []}', headers=json_type), 400)["param"] == "model"
    assert _error(post(b'{"model": 5}', headers=json_type), 400)["param"] == "model"
    assert _error(post(b'{"model": "m1", "stream": "yes"}', headers=json_type), 400)["param"] == "stream"
    assert _error(post(b'{"model": "nope"}', headers=json_type), 404)["code"] == "model_not_found"
    _error(post(b'{"model": "m1"}', headers={"content-type": "text/plain"}), 415)
    _error(post(b'{"model": "m1"}', headers={"content-type": "application/x-www-form-urlencoded"}), 415)
    big = json.dumps(chat(pad="x" * 4096)).encode()
    _error(post(big, headers=json_type), 413)
    _error(post(iter([big[:1000], big[1000:]]), headers=json_type), 413)  # chunked, no content-length
    e = client.post("/v1/embeddings", json={"model": "m1", "input": "x", "stream": True})
    _error(e, 400)
    _error(client.get("/v1/chat/completions"), 405)
    _error(client.post("/v1/nothing", json=chat()), 404)
    assert cluster.requests == []


def test_embeddings_and_models(open_router):
    client, cluster = open_router
    r = client.post("/v1/embeddings", json={"model": "m1", "input": ["a", "b"]})
    assert r.status_code == 200 and len(r.json()["data"]) == 2
    assert cluster.requests[0].path == "/v1/embeddings"
    assert client.get("/v1/models").json()["data"][0]["id"] == "m1"


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
_bodies = st.one_of(
    st.binary(max_size=300),
    _json.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {},
        optional={
            "model": st.sampled_from(["m1", "", "other"]) | _json,
            "stream": _json,
            "stream_options": _json,
            "messages": _json,
            "prompt": _json,
        },
    ).map(lambda v: json.dumps(v).encode()),
    # What a re-encoding or a lenient parser gets wrong: keys twice, lone surrogates, non-finite numbers.
    st.lists(
        st.tuples(
            st.sampled_from(['"model"', '"stream"', '"stream_options"', '"x"', '"\\ud800"']),
            st.sampled_from(['"m1"', "true", "false", "NaN", "-Infinity", '"\\udfff"', '{"include_usage": true}',
                             '{"include_usage": true, "include_usage": false}', '{"\\ud800": "\\udc00x"}', "1e999"]),
        ),
        max_size=4,
    ).map(lambda members: ('{"model": "m1", "stream": true, ' + ", ".join(f"{k}: {v}" for k, v in members)
                           + "}").encode()),
)


def test_generated_bodies_never_get_a_server_error():
    with FakeUpstream("cluster") as cluster, RouterServer(make_settings(cluster)) as router, router.client() as c:

        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
        @given(body=_bodies, path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]))
        def check(body: bytes, path: str) -> None:
            r = c.post(path, content=body, headers={"content-type": "application/json"})
            assert r.status_code < 500, r.text
            if r.status_code >= 400:
                assert set(r.json()["error"]) == {"message", "type", "param", "code"}

        check()


def test_a_client_that_leaves_while_sending_its_body_is_counted_as_gone(fakes):
    cluster = fakes("cluster")
    with RouterServer(make_settings(cluster)) as router:
        with socket.create_connection(("127.0.0.1", router.port)) as raw:
            raw.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                        b"content-length: 100\r\n\r\n{\"model\":")
            time.sleep(0.2)
        gone = {"model": "none", "upstream": "none", "status": "499"}
        deadline = time.monotonic() + 5
        while router.metric("openweight_requests_total", **gone) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert router.metric("openweight_requests_total", **gone) == 1
    assert cluster.requests == []


class _Truncating:
    """An upstream that answers 200 with a Content-Length it never fills, then hangs up."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}/v1"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n"
                             b'{"id": "chatcmpl-1", "choices": [')

    def close(self) -> None:
        self.server.close()


def test_a_non_streamed_answer_cut_short_is_a_502_error_not_a_500():
    upstream = _Truncating()
    try:
        with RouterServer(make_settings(upstream.url)) as router, router.client() as client:
            r = client.post("/v1/chat/completions", json=chat())
            error = _error(r, 502)
            assert error["code"] == "upstream_protocol_error"
            assert r.headers["x-request-id"]
            assert router.metric("openweight_requests_total", upstream="cluster", status="502") == 1
    finally:
        upstream.close()


def _raw(port: int, *parts: bytes, pause_s: float = 0.0) -> tuple[int, dict[str, str], bytes]:
    """Send `parts` (pausing between them), then read until the router closes: status, headers, body."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        for i, part in enumerate(parts):
            if i and pause_s:
                time.sleep(pause_s)
            conn.sendall(part)
        received = b""
        while chunk := conn.recv(65536):
            received += chunk
    if not received:
        return 0, {}, b""
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def _openai_error(body: bytes) -> dict[str, object]:
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error  # type: ignore[no-any-return]


_HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"


def test_a_request_that_does_not_arrive_in_time_gets_a_408_and_the_connection_closes(fakes):
    cluster = fakes("cluster")
    body = json.dumps(chat()).encode()
    with RouterServer(make_settings(cluster, router={"request_read_timeout_s": 0.5})) as router:
        status, headers, answer = _raw(router.port, _HEAD)  # the head never ends
        assert status == 408 and headers["connection"] == "close"
        assert _openai_error(answer)["code"] == "request_timeout"
        assert router.metric("openweight_requests_total", model="none", upstream="none", status="408") == 1

        status, headers, answer = _raw(router.port, _HEAD + b"content-length: %d\r\n\r\n" % len(body), body[:10])
        assert status == 408 and headers["x-request-id"]  # answered by the app: the body never ends
        assert _openai_error(answer)["code"] == "request_timeout"
        assert router.metric("openweight_requests_total", model="none", upstream="none", status="408") == 2

        assert _raw(router.port) == (0, {}, b"")  # a connection that sends nothing is closed, unanswered
    assert cluster.requests == []


def test_slow_requests_within_the_timeout_and_idle_kept_alive_connections_are_served(fakes):
    cluster = fakes("cluster")
    body = json.dumps(chat()).encode()
    request = _HEAD + b"connection: close\r\ncontent-length: %d\r\n\r\n" % len(body) + body
    with RouterServer(make_settings(cluster, router={"request_read_timeout_s": 0.6})) as router:
        # Byte groups 0.2 s apart: each read leaves the request incomplete, none waits the timeout.
        status, _, _ = _raw(router.port, request[:20], request[20:60], request[60:], pause_s=0.2)
        assert status == 200
        with httpx.Client(base_url=router.url, timeout=10) as client:
            assert client.post("/v1/chat/completions", json=chat()).status_code == 200
            time.sleep(1.0)  # idle between requests: the keep-alive timeout's business, not the read timeout's
            r = client.post("/v1/chat/completions", json=chat())
            assert r.status_code == 200 and r.extensions["http_version"] == b"HTTP/1.1"
            assert client.post("/v1/chat/completions", json=chat()).status_code == 200
        assert len(cluster.requests) == 4


def test_an_oversized_request_head_gets_a_431_and_a_malformed_request_an_openai_400(fakes):
    cluster = fakes("cluster")
    with RouterServer(make_settings(cluster, router={"max_header_bytes": 2048})) as router:
        with router.client() as client:  # a head under the limit is fine
            assert client.post("/v1/chat/completions", json=chat(), headers={"x-pad": "a" * 1500}).status_code == 200
        many = (_HEAD + b"x-pad: " + b"a" * 1500 + b"\r\n", b"x-more: " + b"b" * 1500)
        status, headers, answer = _raw(router.port, *many)
        assert status == 431 and headers["connection"] == "close"
        assert _openai_error(answer)["code"] == "request_header_fields_too_large"
        status, _, answer = _raw(router.port, _HEAD + b"x-endless: ", *[b"c" * 1000] * 5)  # one value, never ending
        assert status == 431
        status, headers, answer = _raw(router.port, b"NOT AN HTTP REQUEST\r\n\r\n")
        assert status == 400 and headers["content-type"] == "application/json"
        assert _openai_error(answer)["type"] == "invalid_request_error"
        assert router.metric("openweight_requests_total", model="none", upstream="none", status="431") == 2
        assert router.metric("openweight_requests_total", model="none", upstream="none", status="400") == 1
    assert len(cluster.requests) == 1


def _responses(conn: socket.socket, count: int) -> tuple[list[tuple[int, dict[str, str], bytes]], bytes]:
    """Read `count` answers (content-length or chunked) from `conn`, then what follows until it closes."""
    buffer, answers = b"", []

    def more() -> bool:
        nonlocal buffer
        data = conn.recv(65536)
        buffer += data
        return bool(data)

    while len(answers) < count:
        while b"\r\n\r\n" not in buffer:
            assert more(), f"closed after {len(answers)} answers"
        head, _, buffer = buffer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        body = b""
        if "content-length" in headers:
            while len(buffer) < int(headers["content-length"]):
                assert more()
            body, buffer = buffer[:int(headers["content-length"])], buffer[int(headers["content-length"]):]
        else:  # chunked
            while True:
                while b"\r\n" not in buffer:
                    assert more()
                size = int(buffer.split(b"\r\n", 1)[0], 16)
                while len(buffer.split(b"\r\n", 1)[1]) < size + 2:
                    assert more()
                buffer = buffer.split(b"\r\n", 1)[1]
                body, buffer = body + buffer[:size], buffer[size + 2:]
                if not size:
                    break
        answers.append((int(lines[0].split()[1]), headers, body))
    while more():
        pass
    return answers, buffer


def _post(stream: bool = False, close: bool = False) -> bytes:
    body = json.dumps(chat(stream=stream)).encode()
    return _HEAD + (b"connection: close\r\n" if close else b"") + b"content-length: %d\r\n\r\n" % len(body) + body


def test_pipelined_requests_are_timed_fairly_and_stray_bytes_do_not_hold_a_connection(fakes):
    cluster = fakes("cluster")
    with RouterServer(make_settings(cluster, router={"request_read_timeout_s": 0.8})) as router:
        def exchange(data: bytes, count: int) -> tuple[list[tuple[int, dict[str, str], bytes]], bytes]:
            with socket.create_connection(("127.0.0.1", router.port), timeout=20) as conn:
                conn.sendall(data)
                return _responses(conn, count)

        # A whole request and the start of the next one in one write: 200, then 408 for the second.
        (first, second), _ = exchange(_post() + _HEAD, 2)
        assert (first[0], second[0]) == (200, 408)
        # A stream that outlasts the timeout, with a pipelined request behind it whose bytes wait
        # unread on the router's side: both are served.
        cluster.script(Behavior(chunks=8, chunk_delay_s=0.25))
        (streamed, plain), rest = exchange(_post(stream=True) + _post(close=True), 2)
        assert (streamed[0], plain[0]) == (200, 200) and streamed[2].rstrip().endswith(b"data: [DONE]")
        # The same stream with a pipelined head that never ends: the stream finishes, then the connection closes.
        cluster.script(Behavior(chunks=8, chunk_delay_s=0.25))
        (streamed,), rest = exchange(_post(stream=True) + _HEAD, 1)
        assert streamed[0] == 200 and streamed[2].rstrip().endswith(b"data: [DONE]") and rest == b""
        # Blank lines between requests start none: they do not keep a connection open.
        with socket.create_connection(("127.0.0.1", router.port), timeout=20) as conn:
            conn.sendall(_post())
            conn.settimeout(0.3)
            received, closed, deadline = b"", False, time.monotonic() + 10
            while not closed and time.monotonic() < deadline:
                try:
                    conn.sendall(b"\r\n")
                    chunk = conn.recv(65536)
                    received, closed = received + chunk, not chunk
                except TimeoutError:
                    pass
                except OSError:
                    closed = True
            assert received.startswith(b"HTTP/1.1 200") and closed
        assert router.metric("openweight_requests_total", model="none", upstream="none", status="499") == 0
        assert router.metric("openweight_requests_total", model=MODEL, upstream="cluster", status="499") == 0


def test_limits_hold_however_the_head_arrives_and_a_malformed_body_is_answered_by_the_app(fakes, caplog):
    cluster = fakes("cluster")
    settings = make_settings(cluster, router={"max_header_bytes": 2048, "request_read_timeout_s": 0.5})
    with RouterServer(settings) as router:
        big = _post().replace(b"\r\n\r\n", b"\r\nx-pad: " + b"a" * 3000 + b"\r\n\r\n", 1)
        assert _raw(router.port, big)[0] == 431  # whole, in one write
        assert _raw(router.port, *(big[i:i + 100] for i in range(0, len(big), 100)))[0] == 431  # in small writes
        assert _raw(router.port, _post() + big)[0] == 200  # behind a good request: it is answered, then the close

        chunked = _HEAD + b"transfer-encoding: chunked\r\n\r\n" + b"5\r\n{\"mod\r\nZZ not a chunk size\r\n"
        status, headers, answer = _raw(router.port, chunked)
        assert status == 400 and headers["x-request-id"]  # the app answered: it was reading the body
        assert _openai_error(answer)["type"] == "invalid_request_error"

        upgrade = _post().replace(b"\r\n\r\n", b"\r\nconnection: Upgrade, HTTP2-Settings\r\nupgrade: h2c\r\n"
                                  b"http2-settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n", 1)
        status, _, answer = _raw(router.port, upgrade)
        assert status == 400 and "Upgrade" in str(_openai_error(answer)["message"])
        get = b"GET /v1/models HTTP/1.1\r\nhost: x\r\nconnection: Upgrade\r\nupgrade: h2c\r\n\r\n"
        status, _, answer = _raw(router.port, get)  # no body to lose: served, then the connection closes
        assert status == 200 and json.loads(answer)["data"][0]["id"] == MODEL

        assert _raw(router.port, b"GARBAGE " * 400)[0] == 400  # more than the head limit in one read
        time.sleep(2.5)  # past the read timeout and the lingering close of every connection above
        for status, count in (("400", 3), ("431", 2)):
            assert router.metric("openweight_requests_total", model="none", upstream="none", status=status) == count
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
    assert len(cluster.requests) == 1


def test_early_answers_trailers_and_pipelined_expect_are_handled(fakes, caplog):
    cluster = fakes("cluster")
    settings = make_settings(cluster, router={"request_read_timeout_s": 1.0, "max_body_bytes": 2048,
                                              "max_header_bytes": 2048})
    with RouterServer(settings, timeout_keep_alive=1) as router:
        # Answered before its body arrived (415), then the body, then idle: closed at the keep-alive timeout.
        with socket.create_connection(("127.0.0.1", router.port), timeout=20) as conn:
            conn.sendall(_post().replace(b"application/json", b"text/plain").split(b"\r\n\r\n")[0] + b"\r\n\r\n")
            time.sleep(0.3)
            conn.sendall(json.dumps(chat()).encode())
            (answer,), _ = _responses(conn, 1)  # then reads until the router closes
        assert answer[0] == 415
        # Trailers past the request's bound: the app answers 413 and nothing grows without limit.
        status, _, _ = _raw(router.port, _HEAD + b"transfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n",
                            *[b"x-trailer: " + b"t" * 1000 + b"\r\n"] * 100)
        assert status == 413
        # A pipelined request whose client waits for 100 Continue, behind a stream outlasting the timeout.
        cluster.script(Behavior(chunks=6, chunk_delay_s=0.3))
        body = json.dumps(chat()).encode()
        with socket.create_connection(("127.0.0.1", router.port), timeout=20) as conn:
            conn.sendall(_post(stream=True) + _HEAD + b"expect: 100-continue\r\nconnection: close\r\n"
                         b"content-length: %d\r\n\r\n" % len(body))
            received = b""
            while b"100 Continue" not in received:
                chunk = conn.recv(65536)
                assert chunk, received
                received += chunk
            conn.sendall(body)
            while chunk := conn.recv(65536):
                received += chunk
        assert received.startswith(b"HTTP/1.1 200") and received.count(b"HTTP/1.1 200") == 2, received[-300:]
        # An oversized head with a request behind it in the same write: one answer, nothing else runs.
        big = _post().replace(b"\r\n\r\n", b"\r\nx-pad: " + b"a" * 3000 + b"\r\n\r\n", 1)
        with socket.create_connection(("127.0.0.1", router.port), timeout=20) as conn:
            conn.sendall(big + b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n")
            (answer,), rest = _responses(conn, 1)
        assert answer[0] == 431 and rest == b""
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
    assert len(cluster.requests) == 2
