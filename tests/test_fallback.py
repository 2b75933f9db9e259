"""Routing through real routers to fake upstreams: policies, fallback triggers, retries, circuits."""

from __future__ import annotations

import time

import pytest

from router.testing import Behavior
from tests.support import MODEL, RouterServer, chat, make_settings, refused_url


def test_cluster_serves_first_and_gets_the_request_untouched(fakes):
    cluster, prov = fakes("cluster"), fakes("prov")
    with RouterServer(make_settings(cluster, {"prov": prov})) as router, router.client() as client:
        body = chat(temperature=0, extra_field={"kept": [1, 2]})
        r = client.post("/v1/chat/completions", json=body, headers={"x-request-id": "req-42"})
    assert r.status_code == 200
    assert r.headers["x-openweight-upstream"] == "cluster"
    assert r.headers["x-openweight-attempts"] == "1"
    assert r.headers["x-request-id"] == "req-42"
    assert r.json()["choices"][0]["message"]["content"].startswith("tok0")
    sent = cluster.requests[0]
    assert sent.body == body
    assert sent.headers["x-request-id"] == "req-42"
    assert float(sent.headers["x-request-timeout-seconds"]) > 0
    assert sent.headers["accept-encoding"] == "identity"  # answers come back as bytes that relay event by event
    assert prov.requests == []


def test_an_upstream_s_cookies_never_go_out_with_later_requests(fakes):
    cluster = fakes("cluster")
    cluster.script(Behavior(headers={"set-cookie": "session=abc; Path=/"}))
    by_name = f"http://localhost:{cluster.port}/v1"  # cookie jars ignore cookies from IP addresses
    with RouterServer(make_settings(by_name)) as router, router.client() as client:
        for _ in range(2):
            assert client.post("/v1/chat/completions", json=chat()).status_code == 200
    assert [("cookie" in sent.headers) for sent in cluster.requests] == [False, False]


def test_provider_gets_its_own_model_id_and_key(fakes, monkeypatch):
    monkeypatch.setenv("PROV_KEY", "sk-provider-secret\n")  # as a key mounted from a file reads
    cluster, prov = fakes("cluster", default=Behavior(status=500)), fakes("prov")
    settings = make_settings(cluster, {"prov": prov})
    providers = {"prov": settings.providers["prov"].model_copy(update={"api_key_env": "PROV_KEY"})}
    with RouterServer(settings.model_copy(update={"providers": providers})) as router, router.client() as c:
        r = c.post("/v1/chat/completions", json=chat())
    assert r.headers["x-openweight-upstream"] == "prov"
    assert prov.requests[0].body["model"] == "prov-model"
    assert prov.requests[0].headers["authorization"] == "Bearer sk-provider-secret"
    assert "authorization" not in cluster.requests[0].headers


@pytest.mark.parametrize(
    ("behavior", "reason"),
    [
        (Behavior(status=500), "server_error"),
        (Behavior(status=502), "server_error"),
        (Behavior(status=503), "overloaded"),
        (Behavior(status=408), "timeout"),
        (Behavior(status=429, headers={"retry-after": "1"}), "overloaded"),
        (Behavior(hang=True), "timeout"),
        (Behavior(delay_before_headers_s=5), "timeout"),
        (Behavior(status=301, headers={"location": "https://elsewhere.example/v1"}), "server_error"),
    ],
    ids=["500", "502", "503", "408", "429", "hang", "slow-headers", "redirect"],
)
def test_each_trigger_falls_back_to_the_provider(fakes, behavior, reason):
    cluster, prov = fakes("cluster", default=behavior), fakes("prov")
    with RouterServer(make_settings(cluster, {"prov": prov})) as router, router.client() as client:
        r = client.post("/v1/chat/completions", json=chat())
        assert r.status_code == 200, r.text
        assert r.headers["x-openweight-upstream"] == "prov"
        assert r.headers["x-openweight-attempts"] == "2"
        assert router.metric("openweight_fallbacks_total", from_upstream="cluster", to_upstream="prov",
                             reason=reason) == 1


def test_connection_refused_falls_back(fakes):
    prov = fakes("prov")
    with RouterServer(make_settings(refused_url(), {"prov": prov})) as router, router.client() as client:
        r = client.post("/v1/chat/completions", json=chat())
        assert r.headers["x-openweight-upstream"] == "prov"
        assert router.metric("openweight_fallbacks_total", reason="connect_error") == 1
        assert router.metric("openweight_upstream_attempts_total", upstream="cluster", outcome="connect_error") == 1


def test_stream_headers_then_silence_falls_back_before_any_byte(fakes):
    cluster = fakes("cluster", default=Behavior(chunk_delay_s=5))
    prov = fakes("prov")
    with RouterServer(make_settings(cluster, {"prov": prov})) as router, router.client() as client:
        r = client.post("/v1/chat/completions", json=chat(stream=True))
    assert r.headers["x-openweight-upstream"] == "prov"
    assert r.text.rstrip().endswith("data: [DONE]")


@pytest.mark.parametrize("status", [400, 404, 413, 422])
def test_client_errors_return_as_they_are(fakes, status):
    body = b'{"error": {"message": "context too long", "type": "invalid_request_error", "code": "x"}}'
    cluster = fakes("cluster", default=Behavior(status=status, body=body))
    prov = fakes("prov")
    with RouterServer(make_settings(cluster, {"prov": prov})) as router, router.client() as client:
        r = client.post("/v1/chat/completions", json=chat())
        assert r.status_code == status
        assert r.content == body
        assert r.headers["x-openweight-upstream"] == "cluster"
        assert prov.requests == []
        assert router.metric("openweight_circuit_state", upstream="cluster") == 0


def test_a_plain_404_means_the_upstream_serves_no_api_and_falls_back(fakes):
    missing = Behavior(status=404, body=b"Path '/v1/chat/completions' not found.",
                       headers={"content-type": "text/plain"})
    cluster, prov = fakes("cluster", default=missing), fakes("prov")
    with RouterServer(make_settings(cluster, {"prov": prov})) as router, router.client() as client:
        r = client.post("/v1/chat/completions", json=chat())
        assert r.headers["x-openweight-upstream"] == "prov"
        assert router.metric("openweight_fallbacks_total", from_upstream="cluster", reason="server_error") == 1


def test_upstream_auth_failure_is_ours_not_the_clients(fakes):
    leaked = b'{"error": {"message": "Incorrect API key provided: sk-prov****cret"}}'
    first, second = fakes("first", default=Behavior(status=401, body=leaked)), fakes("second")
    settings = make_settings(None, {"first": first, "second": second}, policy="provider_only")
    with RouterServer(settings) as router, router.client() as client:
        r = client.post("/v1/chat/completions", json=chat())
    assert r.headers["x-openweight-upstream"] == "second"
    assert b"sk-prov" not in r.content


def test_a_provider_error_that_echoes_its_key_is_relayed_without_it(fakes, monkeypatch):
    monkeypatch.setenv("PROV_KEY", "sk-provider-secret")
    echo = b'{"error": {"message": "bad request for key Bearer sk-provider-secret", "type": "invalid_request_error"}}'
    prov = fakes("prov", default=Behavior(status=400, body=echo))
    settings = make_settings(None, {"prov": prov}, policy="provider_only")
    providers = {"prov": settings.providers["prov"].model_copy(update={"api_key_env": "PROV_KEY"})}
    with RouterServer(settings.model_copy(update={"providers": providers})) as router, router.client() as c:
        r = c.post("/v1/chat/completions", json=chat())
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "bad request for key Bearer <redacted>"


def test_a_full_connection_limit_moves_on_at_once_and_leaves_the_circuit_alone(fakes):
    cluster, prov = fakes("cluster", default=Behavior(chunks=6, chunk_delay_s=0.2)), fakes("prov")
    limited = {"max_connections": 1, "first_byte_timeout_s": 5, "circuit": {"failure_threshold": 1}}
    with (
        RouterServer(make_settings(cluster, {"prov": prov}, cluster_extra=limited)) as router,
        router.client() as client,
        router.client() as other,
        client.stream("POST", "/v1/chat/completions", json=chat(stream=True)) as held,
    ):
        lines = held.iter_lines()
        next(line for line in lines if line.startswith("data: "))  # the one connection is taken
        for _ in range(3):
            start = time.monotonic()
            r = other.post("/v1/chat/completions", json=chat())
            assert time.monotonic() - start < 1  # no wait for a pooled connection
            assert r.headers["x-openweight-upstream"] == "prov"
            assert r.headers["x-openweight-attempts"] == "1"
        assert router.metric("openweight_circuit_state", upstream="cluster") == 0
        assert router.metric("openweight_fallbacks_total", from_upstream="cluster", reason="overloaded") == 3
        assert [line for line in lines if line][-1] == "data: [DONE]"
        assert other.post("/v1/chat/completions", json=chat()).headers["x-openweight-upstream"] == "cluster"
    assert len(cluster.requests) == 2


def test_every_upstream_failing_gives_one_openai_error(fakes):
    cluster = fakes("cluster", default=Behavior(status=500))
    prov = fakes("prov", default=Behavior(status=429, headers={"retry-after": "30"}))
    with RouterServer(make_settings(cluster, {"prov": prov})) as router, router.client() as client:
        r = client.post("/v1/chat/completions", json=chat())
        assert r.status_code == 503
        error = r.json()["error"]
        assert error["type"] == "service_unavailable"
        assert "cluster: server error (500)" in error["message"]
        assert "prov: overloaded (429)" in error["message"]
        assert r.headers["retry-after"] == "30"
        assert r.headers["x-openweight-upstream"] == "none"
        assert r.headers["x-openweight-attempts"] == str(len(cluster.requests) + len(prov.requests))
        assert router.metric("openweight_requests_total", model=MODEL, upstream="none", status="503") == 1
        assert router.metric("openweight_fallbacks_total", from_upstream="prov", to_upstream="none") == 1


def test_only_the_last_target_is_retried(fakes):
    cluster = fakes("cluster", default=Behavior(status=500))
    prov = fakes("prov")
    prov.script(Behavior(status=502), Behavior(status=503))
    with RouterServer(make_settings(cluster, {"prov": prov})) as router, router.client() as client:
        r = client.post("/v1/chat/completions", json=chat())
    assert r.status_code == 200
    assert r.headers["x-openweight-attempts"] == "4"
    assert len(cluster.requests) == 1
    assert len(prov.requests) == 3


def test_tries_that_find_the_last_target_saturated_send_no_request_and_count_none(fakes):
    cluster = fakes("cluster", default=Behavior(chunks=10, chunk_delay_s=0.2))
    limited = {"max_connections": 1, "first_byte_timeout_s": 5}
    settings = make_settings(cluster, policy="self_hosted_only", cluster_extra=limited)
    with (
        RouterServer(settings) as router,
        router.client() as client,
        router.client() as other,
        client.stream("POST", "/v1/chat/completions", json=chat(stream=True)) as held,
    ):
        lines = held.iter_lines()
        next(line for line in lines if line.startswith("data: "))  # the one connection is taken
        r = other.post("/v1/chat/completions", json=chat())
        assert r.status_code == 503
        assert r.headers["x-openweight-attempts"] == "0"
        assert router.metric("openweight_upstream_attempts_total", upstream="cluster", outcome="overloaded") == 3
        assert [line for line in lines if line][-1] == "data: [DONE]"
    assert len(cluster.requests) == 1


def test_retries_stop_at_the_deadline(fakes):
    cluster = fakes("cluster", default=Behavior(status=503, delay_before_headers_s=0.1))
    settings = make_settings(
        cluster, policy="self_hosted_only",
        router={"deadline_s": 0.6, "retry": {"max_attempts": 100, "backoff_initial_s": 0.05, "backoff_max_s": 0.1}},
        cluster_extra={"circuit": {"failure_threshold": 1000}},
    )
    with RouterServer(settings) as router, router.client() as client:
        start = time.monotonic()
        r = client.post("/v1/chat/completions", json=chat())
        elapsed = time.monotonic() - start
    assert r.status_code == 503
    assert 2 <= len(cluster.requests) < 10
    assert elapsed < 3


def test_retry_after_beyond_the_limit_is_not_waited_for(fakes):
    cluster = fakes("cluster", default=Behavior(status=429, headers={"retry-after": "60"}))
    settings = make_settings(cluster, policy="self_hosted_only")
    with RouterServer(settings) as router, router.client() as client:
        r = client.post("/v1/chat/completions", json=chat())
        assert r.status_code == 503
        assert r.headers["retry-after"] == "60"
        again = client.post("/v1/chat/completions", json=chat())  # it asked for a minute: no request
        assert again.status_code == 503
        assert 58 <= int(again.headers["retry-after"]) <= 60
        assert again.headers["x-openweight-attempts"] == "0"
    assert len(cluster.requests) == 1


def test_retry_after_is_honoured_on_the_last_target(fakes):
    cluster = fakes("cluster")
    cluster.script(Behavior(status=429, headers={"retry-after": "0.4"}))
    with RouterServer(make_settings(cluster, policy="self_hosted_only")) as router, router.client() as client:
        start = time.monotonic()
        r = client.post("/v1/chat/completions", json=chat())
    assert r.status_code == 200
    assert r.headers["x-openweight-attempts"] == "2"
    assert time.monotonic() - start >= 0.4


def test_back_pressure_sends_next_requests_elsewhere_until_retry_after(fakes):
    cluster, prov = fakes("cluster"), fakes("prov")
    cluster.script(Behavior(status=429, headers={"retry-after": "1"}))
    with RouterServer(make_settings(cluster, {"prov": prov})) as router, router.client() as client:
        assert client.post("/v1/chat/completions", json=chat()).headers["x-openweight-upstream"] == "prov"
        r = client.post("/v1/chat/completions", json=chat())
        assert r.headers["x-openweight-upstream"] == "prov"
        assert r.headers["x-openweight-attempts"] == "1"
        assert len(cluster.requests) == 1
        assert router.metric("openweight_circuit_state", upstream="cluster") == 0
        time.sleep(1.1)
        assert client.post("/v1/chat/completions", json=chat()).headers["x-openweight-upstream"] == "cluster"


def test_circuit_opens_skips_without_attempt_and_recovers_through_half_open(fakes):
    cluster, prov = fakes("cluster", default=Behavior(status=500)), fakes("prov")
    with RouterServer(make_settings(cluster, {"prov": prov})) as router, router.client() as client:
        for _ in range(3):  # failure_threshold
            assert client.post("/v1/chat/completions", json=chat()).headers["x-openweight-upstream"] == "prov"
        assert router.metric("openweight_circuit_state", upstream="cluster") == 2
        r = client.post("/v1/chat/completions", json=chat())
        assert r.headers["x-openweight-attempts"] == "1"
        assert len(cluster.requests) == 3
        assert router.metric("openweight_fallbacks_total", from_upstream="cluster", reason="circuit_open") == 1

        cluster.default = Behavior()
        time.sleep(0.6)  # reset_timeout_s
        assert router.metric("openweight_circuit_state", upstream="cluster") == 1
        r = client.post("/v1/chat/completions", json=chat())
        assert r.headers["x-openweight-upstream"] == "cluster"
        assert router.metric("openweight_circuit_state", upstream="cluster") == 0


def test_every_circuit_open_answers_503_with_retry_after_until_one_reopens(fakes):
    cluster, prov = fakes("cluster", default=Behavior(status=500)), fakes("prov", default=Behavior(status=500))
    settings = make_settings(cluster, {"prov": prov}, router={"retry": {"max_attempts": 1}})
    slow = {"failure_threshold": 1, "reset_timeout_s": 30}
    settings = settings.model_copy(update={
        "cluster": settings.cluster.model_copy(update={"circuit": settings.cluster.circuit.model_copy(update=slow)}),
        "providers": {"prov": settings.providers["prov"].model_copy(
            update={"circuit": settings.providers["prov"].circuit.model_copy(update=slow)})},
    })
    with RouterServer(settings) as router, router.client() as client:
        assert client.post("/v1/chat/completions", json=chat()).status_code == 503  # both fail: both open
        r = client.post("/v1/chat/completions", json=chat())
        assert r.status_code == 503 and r.json()["error"]["message"].count("circuit open") == 2
        assert 28 <= int(r.headers["retry-after"]) <= 30
        assert len(cluster.requests) == len(prov.requests) == 1
        assert router.metric("openweight_circuit_state", upstream="prov") == 2


def test_a_failed_half_open_trial_opens_the_circuit_again(fakes):
    cluster, prov = fakes("cluster", default=Behavior(status=500)), fakes("prov")
    with RouterServer(make_settings(cluster, {"prov": prov})) as router, router.client() as client:
        for _ in range(3):
            client.post("/v1/chat/completions", json=chat())
        time.sleep(0.6)
        client.post("/v1/chat/completions", json=chat())  # the trial fails
        assert len(cluster.requests) == 4
        assert router.metric("openweight_circuit_state", upstream="cluster") == 2
        client.post("/v1/chat/completions", json=chat())
        assert len(cluster.requests) == 4


def test_prober_opens_the_circuit_of_a_dead_cluster_before_any_request(fakes):
    prov = fakes("prov")
    settings = make_settings(refused_url(), {"prov": prov}, router={"probe_interval_s": 0.05})
    cluster = settings.cluster.model_copy(update={"probe": True})
    with RouterServer(settings.model_copy(update={"cluster": cluster})) as router, router.client() as client:
        deadline = time.monotonic() + 5
        while router.metric("openweight_circuit_state", upstream="cluster") != 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert router.metric("openweight_upstream_up", upstream="cluster") == 0
        r = client.post("/v1/chat/completions", json=chat())
        assert r.headers["x-openweight-attempts"] == "1"
        assert router.metric("openweight_upstream_attempts_total", upstream="cluster", outcome="connect_error") == 0


def test_readyz_reports_models_without_a_live_upstream(fakes):
    settings = make_settings(refused_url(), policy="self_hosted_only", router={"probe_interval_s": 0.05})
    cluster = settings.cluster.model_copy(update={"probe": True})
    with RouterServer(settings.model_copy(update={"cluster": cluster})) as router, router.client() as client:
        r = client.get("/readyz")
        assert r.status_code == 503
        assert r.json()["models_without_upstream"] == [MODEL]
        assert router.metric("openweight_model_upstreams_up", model=MODEL) == 0
        assert client.get("/healthz").status_code == 200
    live = fakes("cluster")
    prov = fakes("prov")
    with RouterServer(make_settings(live, {"prov": prov})) as router, router.client() as client:
        assert client.get("/readyz").status_code == 200
        assert router.metric("openweight_model_upstreams_up", model=MODEL) == 2


class TestPolicies:
    def test_self_hosted_only_never_calls_a_provider(self, fakes):
        cluster, prov = fakes("cluster", default=Behavior(status=503)), fakes("prov")
        settings = make_settings(cluster, {"prov": prov}, policy="self_hosted_only")
        with RouterServer(settings) as router, router.client() as client:
            assert client.post("/v1/chat/completions", json=chat()).status_code == 503
        assert prov.requests == []

    def test_provider_first(self, fakes):
        cluster, prov = fakes("cluster"), fakes("prov", default=Behavior(status=500))
        settings = make_settings(cluster, {"prov": prov}, policy="provider_first")
        with RouterServer(settings) as router, router.client() as client:
            r = client.post("/v1/chat/completions", json=chat())
        assert r.headers["x-openweight-upstream"] == "cluster"
        assert len(prov.requests) == 1

    def test_provider_only_never_calls_the_cluster(self, fakes):
        cluster, prov = fakes("cluster"), fakes("prov", default=Behavior(status=500))
        settings = make_settings(cluster, {"prov": prov}, policy="provider_only")
        with RouterServer(settings) as router, router.client() as client:
            assert client.post("/v1/chat/completions", json=chat()).status_code == 503
        assert cluster.requests == []

    def test_providers_are_tried_in_order(self, fakes):
        cluster = fakes("cluster", default=Behavior(status=500))
        a, b = fakes("a", default=Behavior(status=500)), fakes("b")
        with RouterServer(make_settings(cluster, {"a": a, "b": b})) as router, router.client() as client:
            r = client.post("/v1/chat/completions", json=chat())
        assert r.headers["x-openweight-upstream"] == "b"
        assert r.headers["x-openweight-attempts"] == "3"

    def test_inactive_provider_is_never_called(self, fakes, monkeypatch):
        monkeypatch.delenv("UNSET_PROVIDER_KEY", raising=False)
        cluster = fakes("cluster", default=Behavior(status=500))
        off, on = fakes("off"), fakes("on")
        settings = make_settings(cluster, {"off": off, "on": on})
        providers = dict(settings.providers)
        providers["off"] = providers["off"].model_copy(update={"api_key_env": "UNSET_PROVIDER_KEY"})
        with RouterServer(settings.model_copy(update={"providers": providers})) as router, router.client() as c:
            assert c.post("/v1/chat/completions", json=chat()).headers["x-openweight-upstream"] == "on"
        assert off.requests == []

    def test_spillover_on_back_pressure(self, fakes):
        cluster, prov = fakes("cluster"), fakes("prov")
        cluster.script(Behavior(status=503, headers={"retry-after": "1"}))
        settings = make_settings(cluster, {"prov": prov}, policy="spillover")
        with RouterServer(settings) as router, router.client() as client:
            assert client.post("/v1/chat/completions", json=chat()).headers["x-openweight-upstream"] == "prov"
            r = client.post("/v1/chat/completions", json=chat())
            assert r.headers["x-openweight-upstream"] == "prov"
            assert router.metric("openweight_fallbacks_total", reason="overloaded") == 1
            assert router.metric("openweight_fallbacks_total", from_upstream="cluster", to_upstream="prov",
                                 reason="spillover") == 1

    def test_spillover_past_the_in_flight_limit(self, fakes):
        cluster, prov = fakes("cluster", default=Behavior(chunks=3, chunk_delay_s=0.5)), fakes("prov")
        settings = make_settings(cluster, {"prov": prov}, policy="spillover", spillover_in_flight=1)
        with RouterServer(settings) as router, router.client() as client:
            with client.stream("POST", "/v1/chat/completions", json=chat(stream=True)) as slow:
                assert slow.headers["x-openweight-upstream"] == "cluster"
                r = client.post("/v1/chat/completions", json=chat())
                assert r.headers["x-openweight-upstream"] == "prov"
                slow.read()
            assert client.post("/v1/chat/completions", json=chat()).headers["x-openweight-upstream"] == "cluster"
