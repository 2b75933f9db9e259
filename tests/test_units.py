"""Pure parts without a server: settings, policy, circuit breaker, SSE tracking, request parsing."""

from __future__ import annotations

import base64
import itertools
import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.auth import Principal, RateLimiter
from router.config_file import load_settings
from router.dispatch import outcome_of, retry_after_s
from router.errors import InvalidRequest, RateLimited
from router.health import Breaker, CircuitState, HealthSnapshot, UpstreamHealth
from router.outcomes import Outcome
from router.policy import Skip, Target, plan
from router.relay import SseTracker
from router.schemas import Endpoint, _scan_object, parse_request, usage_of
from router.settings import CircuitConfig, ConfigError, RateLimit, Settings
from router.upstreams.credentials import Credentials, media_type

EXAMPLE = Path(__file__).parent.parent / "deploy" / "examples" / "minimal.yaml"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_minimal_example_loads_and_env_overrides_it(monkeypatch):
    settings = load_settings(EXAMPLE)
    model = settings.models["smollm2-135m-instruct"]
    assert model.policy == "self_hosted_first"
    assert model.fallbacks[0].model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert settings.cluster.url == "http://127.0.0.1:8100/v1"
    monkeypatch.setenv("OPENWEIGHT_CLUSTER__URL", "http://ray-head:8000/v1/")
    monkeypatch.setenv("OPENWEIGHT_ROUTER__PORT", "9100")
    monkeypatch.setenv("OPENWEIGHT_CONFIG", str(EXAMPLE))
    settings = load_settings()
    assert settings.cluster.url == "http://ray-head:8000/v1"
    assert settings.router.port == 9100


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"models": {}}, "models: at least one model"),
        ({"models": {"m": {"policy": "nope"}}}, "models.m.policy"),
        ({"models": {"m": {"fallbacks": [{"provider": "x", "model": "y"}]}}}, "models.m.fallbacks.0.provider"),
        ({"models": {"m": {"policy": "provider_only"}}}, "models.m.policy: provider_only needs"),
        ({"models": {"m": {}}, "cluster": {"url": "localhost:8000"}}, "cluster.url"),
        ({"models": {"m": {}}, "router": {"port": 70000}}, "router.port"),
        ({"models": {"m": {}}, "providers": {"cluster": {"url": "http://x"}}}, "providers.cluster"),
        ({"models": {"m": {"colour": "red"}}}, "models.m.colour"),
        ({"models": {"a": {"serve": {"source": "org/a"}}, "b": {}}}, "models.b.serve: self_hosted_first sends it"),
    ],
)
def test_config_errors_name_the_key(tmp_path, raw, key):
    file = tmp_path / "c.yaml"
    file.write_text(json.dumps(raw))
    with pytest.raises(ConfigError) as caught:
        load_settings(file)
    assert any(line.startswith(key) for line in str(caught.value).splitlines()), str(caught.value)


def test_every_problem_is_a_line_of_its_own_that_starts_with_its_key(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text(json.dumps({"models": {
        "m": {"policy": "provider_only"},
        "n": {"fallbacks": [{"provider": "x", "model": "y"}]},
        "hosted": {"serve": {"source": "org/a"}},
        "elsewhere": {"policy": "provider_only", "fallbacks": [{"provider": "x", "model": "y"}]},
    }}))
    with pytest.raises(ConfigError) as caught:
        load_settings(file)
    assert str(caught.value).splitlines() == [
        "models.m.policy: provider_only needs at least one fallback",
        "models.n.fallbacks.0.provider: unknown provider 'x'",
        "models.n.serve: self_hosted_first sends it to the cluster, which this file deploys without it "
        "(only hosted have serve:); add serve: or use provider_only",
        "models.elsewhere.fallbacks.0.provider: unknown provider 'x'",
    ]


def test_check_config_shows_no_secret_of_the_serve_block_or_in_urls():
    settings = Settings(
        cluster={"url": "http://ray:pw-cluster@ray-head:8000/v1"},
        providers={"p": {"url": "https://user:pw-provider@api.example/v1", "headers": {"x-api-key": "pw-header"}}},
        models={"m": {"serve": {"source": "org/m", "env": {"HF_TOKEN": "pw-env", "VLLM_LOGGING_LEVEL": "INFO"},
                                "engine_args": {"hf_token": "pw-arg", "tokenizer": "org/tok",
                                                "max_num_batched_tokens": 4096}}}},
    )
    shown = settings.redacted()
    assert "pw-" not in json.dumps(shown)
    assert shown["cluster"]["url"] == "http://<redacted>@ray-head:8000/v1"
    assert shown["providers"]["p"]["url"] == "https://<redacted>@api.example/v1"
    serve = shown["models"]["m"]["serve"]
    assert serve["env"] == {"HF_TOKEN": "<redacted>", "VLLM_LOGGING_LEVEL": "INFO"}
    assert serve["engine_args"] == {"hf_token": "<redacted>", "tokenizer": "org/tok", "max_num_batched_tokens": 4096}


def test_unreadable_or_non_mapping_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_settings(tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("a: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(tmp_path / "bad.yaml")


def _settings(policy: str, providers: int = 2) -> Settings:
    names = [f"p{i}" for i in range(providers)]
    return Settings(
        providers={n: {"url": f"http://{n}/v1"} for n in names},
        models={"m": {"policy": policy, "fallbacks": [{"provider": n, "model": f"{n}-id"} for n in names]}},
    )


def _snapshot(in_flight: int = 0, **states: UpstreamHealth) -> HealthSnapshot:
    healthy = UpstreamHealth(CircuitState.CLOSED, False, None)
    upstreams = {"cluster": healthy, "p0": healthy, "p1": healthy, **states}
    return HealthSnapshot(upstreams, in_flight, {"m": in_flight})


@pytest.mark.parametrize(
    ("policy", "order"),
    [
        ("self_hosted_first", ["cluster", "p0", "p1"]),
        ("self_hosted_only", ["cluster"]),
        ("provider_first", ["p0", "p1", "cluster"]),
        ("provider_only", ["p0", "p1"]),
        ("spillover", ["cluster", "p0", "p1"]),
    ],
)
def test_policy_orders(policy, order):
    assert [t.upstream for t in plan(_settings(policy), "m", _snapshot()).targets] == order


def test_open_circuits_are_skipped_and_deferred_upstreams_kept_as_a_last_resort():
    open_ = UpstreamHealth(CircuitState.OPEN, False, None)
    deferred = UpstreamHealth(CircuitState.CLOSED, True, None)
    result = plan(_settings("self_hosted_first"), "m", _snapshot(cluster=open_, p0=deferred))
    assert result.steps == (
        Skip(Target("cluster", "m"), "circuit_open"), Skip(Target("p0", "p0-id"), "overloaded"), Target("p1", "p1-id")
    )
    result = plan(_settings("self_hosted_only"), "m", _snapshot(cluster=deferred))
    assert result.steps == (Target("cluster", "m"),)
    assert plan(_settings("self_hosted_only"), "m", _snapshot(cluster=open_)).targets == ()


def test_spillover_moves_to_providers_on_back_pressure_or_in_flight_limit():
    deferred = UpstreamHealth(CircuitState.CLOSED, True, None)
    over = plan(_settings("spillover"), "m", _snapshot(cluster=deferred))
    assert [t.upstream for t in over.targets] == ["p0", "p1"]
    assert over.steps[0] == Skip(Target("cluster", "m"), "spillover")
    limited = Settings(
        cluster={"max_in_flight": 4},
        providers={"p0": {"url": "http://p0/v1"}},
        models={"m": {"policy": "spillover", "fallbacks": [{"provider": "p0", "model": "x"}]}},
    )
    assert [t.upstream for t in plan(limited, "m", _snapshot(in_flight=3)).targets] == ["cluster", "p0"]
    assert [t.upstream for t in plan(limited, "m", _snapshot(in_flight=4)).targets] == ["p0", "cluster"]


def test_breaker_lifecycle():
    clock = Clock()
    breaker = Breaker(CircuitConfig(failure_threshold=2, reset_timeout_s=10, success_threshold=2), clock)
    breaker.failure()
    assert breaker.state is CircuitState.CLOSED
    breaker.success()
    breaker.failure()
    assert breaker.state is CircuitState.CLOSED  # failures must be consecutive
    breaker.failure()
    assert breaker.state is CircuitState.OPEN and not breaker.acquire()
    clock.now = 4
    assert breaker.reopens_in_s() == 6
    clock.now = 10
    assert breaker.reopens_in_s() == 0
    assert breaker.state is CircuitState.HALF_OPEN
    assert breaker.acquire() and not breaker.acquire()  # one trial at a time
    breaker.success()
    assert breaker.state is CircuitState.HALF_OPEN and breaker.acquire()
    breaker.success()
    assert breaker.state is CircuitState.CLOSED
    breaker.failure(), breaker.failure()
    breaker.probed(True)  # a live probe lets an open circuit try at once
    assert breaker.state is CircuitState.HALF_OPEN
    assert breaker.acquire()
    breaker.failure()
    assert breaker.state is CircuitState.OPEN


def test_outcome_label_values_stay_what_dashboards_and_alert_rules_select_on():
    assert {str(outcome) for outcome in Outcome} == {
        "success", "client_error", "server_error", "auth_error", "timeout", "overloaded", "connect_error",
        "protocol_error", "unavailable", "circuit_open", "spillover", "deadline", "budget", "cold_start",
    }
    statuses_1xx = {101: "protocol_error"}
    assert {status: str(outcome_of(status)) for status in statuses_1xx} == statuses_1xx
    statuses = {200: "success", 302: "server_error", 400: "client_error", 401: "auth_error", 403: "auth_error",
                404: "client_error", 408: "timeout", 429: "overloaded", 500: "server_error", 503: "overloaded"}
    assert {status: str(outcome_of(status)) for status in statuses} == statuses


def test_retry_after_in_seconds_or_as_an_http_date():
    now = lambda: 1_000_000_000.0  # noqa: E731  2001-09-09T01:46:40Z
    assert retry_after_s({"retry-after": "2.5"}, now) == 2.5
    assert retry_after_s({"retry-after": "Sun, 09 Sep 2001 01:47:10 GMT"}, now) == 30
    assert retry_after_s({"retry-after": "Sun, 09 Sep 2001 01:46:00 GMT"}, now) == 0  # already past
    for bad in ("-1", "soon", "", "inf", "nan", "1e400", "1e12"):
        assert retry_after_s({"retry-after": bad}, now) is None
    assert retry_after_s({}, now) is None


def test_sse_tracker_reassembles_events_and_takes_usage():
    stream = (
        b'data: {"choices": [{"delta": {"content": "a"}}], "usage": null}\r\n\r\n'
        b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}\n\n'
        b"data: [DONE]\n\n"
    )
    for size in (1, 7, len(stream)):
        tracker = SseTracker(strip_usage=True)
        out = b"".join(tracker.feed(stream[i : i + size]) for i in range(0, len(stream), size))
        assert out == b'data: {"choices": [{"delta": {"content": "a"}}], "usage": null}\n\ndata: [DONE]\n\n'
        assert tracker.usage == (3, 2) and tracker.done
    kept = SseTracker(strip_usage=False)
    assert b'"prompt_tokens": 3' in kept.feed(stream)
    quoting = SseTracker(strip_usage=False)
    quoting.feed(b'data: {"choices": [{"delta": {"content": "streams end with data: [DONE]"}}]}\n\n')
    assert not quoting.done
    assert quoting.feed(b"data:[DONE]\n\n") and quoting.done  # the space after `data:` is optional


def _reference_tracking(stream: bytes, strip_usage: bool) -> tuple[bytes, tuple[int, int] | None, bool]:
    """What SseTracker must give, the slow and obvious way: every event split out and checked alone."""
    out, usage, done = [], None, False
    events = stream.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n\n")
    if events[-1].rstrip(b"\n") in (b"data: [DONE]", b"data:[DONE]"):  # the last one may lack its blank line
        events[-1] = events[-1].rstrip(b"\n")
        events.append(b"")
    for event in events[:-1]:
        if re.search(rb"(?:^|\n)data: ?\[DONE\]", event):
            done = True
        if event.startswith(b"data:") and re.search(rb'"usage"\s*:\s*\{', event):
            try:
                payload = json.loads(event[5:])
            except ValueError:
                payload = None
            if (found := usage_of(payload)) is not None:
                usage = found
                if strip_usage and isinstance(payload, dict) and payload.get("choices") == []:
                    continue
        out.append(event + b"\n\n")
    return b"".join(out), usage, done


_tricky_text = st.sampled_from(
    ["a", "data: [DONE]", "\ndata: [DONE]\n\n", '"usage": {"prompt_tokens": 1}', "[DONE]", "é"]
)
_sse_events = st.one_of(
    st.builds(lambda text, usage: {"choices": [{"delta": {"content": text}}], "usage": usage},
              st.lists(_tricky_text, max_size=3).map("".join), st.none() | st.just({"completion_tokens": 4})),
    st.builds(lambda p, c: {"choices": [], "usage": {"prompt_tokens": p, "completion_tokens": c}},
              st.integers(0, 99), st.integers(0, 99)),
    st.just("[DONE]"), st.just(": keep-alive comment"), st.just("data: {not json"),
)


@settings(max_examples=300, deadline=None)
@given(events=st.lists(_sse_events, max_size=8), newline=st.sampled_from([b"\n", b"\r\n", b"\r"]),
       spaced=st.booleans(), strip_usage=st.booleans(), cuts=st.lists(st.integers(0, 4000), max_size=6),
       last_end=st.sampled_from([b"", b"\n", b"\n\n"]))
def test_sse_tracker_gives_what_checking_each_event_alone_gives(events, newline, spaced, strip_usage, cuts, last_end):
    def encode(event: object) -> bytes:
        if event == "[DONE]":
            return b"data:[DONE]" if not spaced else b"data: [DONE]"
        if isinstance(event, str):
            return event.encode()
        return b"data: " + json.dumps(event, separators=(", ", ": ") if spaced else (",", ":")).encode()
    stream = b"".join(encode(e) + newline + newline for e in events)
    if events and events[-1] == "[DONE]":  # a last [DONE] may end the body with no blank line, or none at all
        stream = stream[: -2 * len(newline)] + last_end.replace(b"\n", newline)
    bounds = sorted({0, len(stream), *(c for c in cuts if c < len(stream))})
    tracker = SseTracker(strip_usage)
    out = b"".join(tracker.feed(stream[a:b]) for a, b in itertools.pairwise(bounds)) + tracker.finish()
    assert (out, tracker.usage, tracker.done) == _reference_tracking(stream, strip_usage)


def test_parse_request_rewrites_only_the_model_and_usage_option():
    raw = b'{"model": "m", "messages": [], "stream": true, "x": 1.5}'
    parsed = parse_request(Endpoint.CHAT, raw)
    assert json.loads(parsed.body_for("other")) == {
        "model": "other", "messages": [], "stream": True, "x": 1.5, "stream_options": {"include_usage": True}
    }
    plain = parse_request(Endpoint.CHAT, b'{"model": "m", "n": 2}')
    assert plain.body_for("m") == b'{"model": "m", "n": 2}'  # forwarded byte for byte
    with pytest.raises(InvalidRequest, match="stream_options"):
        parse_request(Endpoint.CHAT, b'{"model": "m", "stream_options": {"include_usage": true}}')


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(
    extra=st.dictionaries(st.text(max_size=8).filter(lambda k: k not in ("model", "stream", "stream_options")),
                          _json_values, max_size=4),
    options=st.none() | st.dictionaries(st.sampled_from(["include_usage", "continuous_usage_stats"]),
                                        st.booleans(), max_size=2),
    stream=st.booleans(), model_first=st.booleans(), ascii_only=st.booleans(), spaced=st.booleans(),
    model_id=st.text(min_size=1, max_size=12),
)
def test_body_for_splices_what_a_re_encoding_would_give(extra, options, stream, model_first, ascii_only, spaced,
                                                       model_id):
    body = {"model": "m", **extra} if model_first else {**extra, "model": "m"}
    body["stream"] = stream
    if stream and options is not None:
        body["stream_options"] = options
    separators = (", ", ": ") if spaced else (",", ":")
    raw = json.dumps(body, ensure_ascii=ascii_only, separators=separators).encode()
    parsed = parse_request(Endpoint.CHAT, raw)
    expected = {**body, "model": model_id}
    if stream and not parsed.wants_usage:
        expected["stream_options"] = {**(options or {}), "include_usage": True}
    assert json.loads(parsed.body_for(model_id)) == expected
    if model_id == "m" and not (stream and not parsed.wants_usage):
        assert parsed.body_for(model_id) is raw


def test_bodies_that_could_not_be_re_encoded_are_refused():
    with pytest.raises(InvalidRequest, match="UTF-8"):
        parse_request(Endpoint.CHAT, b'{"model": "m", "x": "\xed\xa0\x80", "stream": true}')
    escaped = parse_request(Endpoint.CHAT, b'{"model": "m", "x": "\\ud800", "stream": true}')
    assert b'"x": "\\ud800"' in escaped.body_for("other")


_objects = st.dictionaries(st.text(max_size=4), _json_values, max_size=4)
_blank = st.sampled_from(["", " ", "\n", "\t\r\n ", "  "])


@settings(max_examples=500, deadline=None)
@given(data=_objects, blanks=st.lists(_blank, min_size=5, max_size=5))
def test_every_json_object_is_scanned_with_its_spans(data, blanks):
    a, b, c, d, e = blanks
    members = [f"{a}{json.dumps(k)}{b}:{c}{json.dumps(v)}{d}" for k, v in data.items()]
    text = e + "{" + ",".join(members) + "}" + a
    scanned = _scan_object(text)
    assert scanned is not None and scanned[0] == json.loads(text)  # so the json.loads fallback never sees an object
    assert {k: json.loads(text[slice(*span)]) for k, span in scanned[1].items()} == data


def test_duplicate_keys_and_non_finite_numbers_are_refused():
    for body, param in [(b'{"model": "a", "model": "b"}', "model"), (b'{"model": "a", "x": 1, "x": 1}', "x"),
                        (b'{"model": "a", "stream": true, "stream_options": {"include_usage": true, '
                         b'"include_usage": false}}', "stream_options.include_usage")]:
        with pytest.raises(InvalidRequest, match="more than once") as refused:
            parse_request(Endpoint.CHAT, body)
        assert refused.value.param == param
    nested = parse_request(Endpoint.CHAT, b'{"model": "a", "messages": [{"role": "a", "role": "b"}]}')
    assert nested.body_for("a") == nested.raw  # below the top level (but for stream_options): forwarded as sent
    for value in (b"NaN", b"Infinity", b"-Infinity", b"[NaN]", b'{"x": Infinity}'):
        with pytest.raises(InvalidRequest, match="not valid JSON"):
            parse_request(Endpoint.CHAT, b'{"model": "a", "x": ' + value + b"}")


def test_credentials_are_redacted_in_every_form_and_keep_headers_clean():
    creds = Credentials.of("https://u%40x:p%2Fss@host/v1", key="k/+=",
                           headers={"x-org": "short", "anthropic-version": "2023-06-01", "x-api-key": "h" * 8,
                                    "Authorization": "Token tok-123"})
    for form in (b"k/+=", b"k\\/+=", b"k%2F%2B%3D", b"k%2f+%3d", b"\\u006B/+\\u003d", b"p/ss", b"u@x:p/ss",
                 b"h" * 8, b"Token tok-123", b"tok-123"):
        assert creds.redact(b"<" + form + b">") == b"<<redacted>>", form
    basic = base64.b64encode(b"u@x:p/ss")  # base64: all but the last characters, which carry other bits
    assert basic not in creds.redact(basic) and creds.redact(basic).startswith(b"<redacted>")
    for plain in (b"short", b"2023-06-01", b"k/+"):
        assert creds.redact(plain) == plain  # not credentials
    assert not Credentials() and Credentials().redact(b"k/+=") == b"k/+="
    assert media_type("text/event-stream; charset=utf-8", creds) == "text/event-stream; charset=utf-8"
    assert media_type('application/json; x="k/+="', creds) is None
    for bad in ("text/html, x", "a" * 200 + "/json", "", "json", "text/plain; x=\u00e9"):
        assert media_type(bad, creds) is None, bad


def test_a_rate_limit_without_burst_allows_one_second_s_worth_at_once():
    clock = Clock()
    limiter = RateLimiter(clock)
    fast, slow = Principal("fast", rate_limit=RateLimit(requests_per_minute=300)), Principal(
        "slow", rate_limit=RateLimit(requests_per_minute=6))
    for _ in range(5):
        limiter.check(fast)
    with pytest.raises(RateLimited):
        limiter.check(fast)
    limiter.check(slow)
    with pytest.raises(RateLimited) as limited:
        limiter.check(slow)
    assert limited.value.headers["retry-after"] == "10"
    clock.now = 0.2
    limiter.check(fast)
    clock.now = 10
    limiter.check(slow)


def test_what_a_lenient_upstream_would_read_otherwise_is_refused():
    deep = b"[" * 985 + b"]" * 985
    for body, match in [
        (b'{"model": "a", "stream": true, "stream_options": {"x": ' + deep + b"}}", "nested too deeply"),
        (b'{"model": "a", "stream": true, "stream_options": {"include_usage": true, "x": ' + deep + b"}}",
         "nested too deeply"),
        (b'{"model": "a", "MODEL": "gpt-4o"}', "'MODEL'"),
        ('{"model": "a", "\u017ftream": true}'.encode(), "'\u017ftream'"),
        (b'{"model": "a", "Stream_Options": {}}', "'Stream_Options'"),
        (b'{"model": "a", "temperature": 1e400}', "out of range"),
        (b'{"model": "a", "x": [-1e999]}', "out of range"),
    ]:
        with pytest.raises(InvalidRequest, match=match):
            parse_request(Endpoint.CHAT, body)
    wide = parse_request(Endpoint.CHAT, '{"model": "a", "x": "\u00e9"}'.encode("utf-16"))
    assert wide.body_for("a") == '{"model": "a", "x": "\u00e9"}'.encode()  # UTF-8 on the wire, no BOM
    assert parse_request(Endpoint.CHAT, b'\xef\xbb\xbf{"model": "a"}').body_for("a") == b'{"model": "a"}'
    assert parse_request(Endpoint.CHAT, b'{"model": "a", "x": 1e300, "modelx": 1}').data["x"] == 1e300
