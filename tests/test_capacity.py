"""Capacity-aware routing through real routers to fake upstreams serving a scripted capacity route."""

from __future__ import annotations

import time

import httpx

from router.replica_wait import WAITING_COMMENT
from tests.support import MODEL, RouterServer, chat, make_settings, until

PROBE_S = 0.2
AT_ZERO = {"running": 0, "starting": 0, "target": 0, "max_ongoing_requests": 4}
RUNNING = {"running": 1, "starting": 0, "target": 1, "max_ongoing_requests": 4}


def _settings(cluster, providers=None, **model):
    router = {"probe_interval_s": PROBE_S, **model.pop("router", {})}
    capacity = {"wake_hold_s": 2, "waiting_comment_interval_s": 0.1, **model.pop("capacity", {})}
    return make_settings(cluster, providers, router=router, cluster_extra={"capacity": capacity}, **model)


def test_a_model_at_zero_is_served_by_its_provider_at_once_and_woken_then_returns(fakes):
    cluster, prov = fakes("cluster"), fakes("prov")
    cluster.capacity = {MODEL: dict(AT_ZERO)}
    with RouterServer(_settings(cluster, {"prov": prov})) as router, router.client() as client:
        assert cluster.wakes == []  # the prober reads capacity but never wakes a model
        r = client.post("/v1/chat/completions", json=chat())
        assert r.status_code == 200 and r.headers["x-openweight-upstream"] == "prov"
        assert r.headers["x-openweight-attempts"] == "1"  # the cluster was not tried at all
        assert cluster.requests == []
        assert router.metric("openweight_fallbacks_total", from_upstream="cluster", to_upstream="prov",
                             reason="cold_start") == 1
        assert router.metric("openweight_cluster_replicas", model=MODEL, state="target") == 0
        assert until(lambda: cluster.wakes == [MODEL])
        cluster.capacity = {MODEL: dict(RUNNING)}  # the wake-up call is answered once a replica runs
        assert until(lambda: router.metric("openweight_cluster_replicas", model=MODEL, state="running") == 1)
        r = client.post("/v1/chat/completions", json=chat())
        assert r.headers["x-openweight-upstream"] == "cluster"
    assert len(prov.requests) == 1 and len(cluster.requests) == 1


def test_a_cluster_without_the_capacity_route_is_routed_as_before(fakes):
    cluster, prov = fakes("cluster"), fakes("prov")  # capacity None: the route answers a plain 404
    with RouterServer(_settings(cluster, {"prov": prov})) as router, router.client() as client:
        r = client.post("/v1/chat/completions", json=chat())
        assert r.headers["x-openweight-upstream"] == "cluster"
        assert "openweight_cluster_replicas{" not in httpx.get(router.url + "/metrics").text
    assert cluster.wakes == [] and prov.requests == []


def test_with_no_provider_a_non_streaming_request_waits_until_its_deadline_then_gets_503(fakes):
    cluster = fakes("cluster")
    cluster.capacity = {MODEL: dict(AT_ZERO)}
    settings = _settings(cluster, policy="self_hosted_only", router={"deadline_s": 0.6})
    with RouterServer(settings) as router, router.client() as client:
        started = time.monotonic()
        r = client.post("/v1/chat/completions", json=chat())
        assert time.monotonic() - started >= 0.6
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
        assert "no replica" in r.json()["error"]["message"]
    assert cluster.requests == [] and cluster.wakes == [MODEL]


def test_with_no_provider_a_stream_gets_waiting_comments_then_the_cluster_s_answer(fakes):
    cluster = fakes("cluster")
    cluster.capacity = {MODEL: dict(AT_ZERO)}
    settings = _settings(cluster, policy="self_hosted_only", router={"deadline_s": 30})
    with (RouterServer(settings) as router, router.client() as client,
          client.stream("POST", "/v1/chat/completions", json=chat(stream=True)) as r):
        assert r.status_code == 200 and r.headers["content-type"] == "text/event-stream"
        parts = r.iter_bytes()
        seen = b""
        while seen.count(WAITING_COMMENT) < 2:
            seen += next(parts)
        cluster.capacity = {MODEL: dict(RUNNING)}
        seen += b"".join(parts)
    body = seen.decode()
    assert body.startswith(WAITING_COMMENT.decode())
    assert "tok0" in body and body.rstrip().endswith("data: [DONE]")
    assert len(cluster.requests) == 1


def test_a_waiting_stream_ends_with_an_error_event_at_its_deadline(fakes):
    cluster = fakes("cluster")
    cluster.capacity = {MODEL: dict(AT_ZERO)}
    settings = _settings(cluster, policy="self_hosted_only", router={"deadline_s": 0.5})
    with RouterServer(settings) as router, router.client() as client:
        r = client.post("/v1/chat/completions", json=chat(stream=True))
    assert r.status_code == 200
    assert r.text.startswith(WAITING_COMMENT.decode())
    assert '"error"' in r.text and "no replica" in r.text and r.text.endswith("data: [DONE]\n\n")
    assert cluster.requests == []


def test_spillover_moves_to_providers_when_the_running_replicas_are_full(fakes):
    from router.testing import Behavior

    cluster, prov = fakes("cluster", default=Behavior(chunk_delay_s=0.3)), fakes("prov")
    cluster.capacity = {MODEL: {"running": 1, "starting": 0, "target": 1, "max_ongoing_requests": 1}}
    with RouterServer(_settings(cluster, {"prov": prov}, policy="spillover")) as router:
        with httpx.Client(base_url=router.url, timeout=20) as client:
            until(lambda: router.metric("openweight_cluster_replicas", model=MODEL, state="running") == 1)
            with client.stream("POST", "/v1/chat/completions", json=chat(stream=True)) as first:
                assert first.headers["x-openweight-upstream"] == "cluster"
                second = client.post("/v1/chat/completions", json=chat())
                assert second.headers["x-openweight-upstream"] == "prov"
                first.read()
        assert router.metric("openweight_fallbacks_total", to_upstream="prov", reason="spillover") == 1


def test_a_route_that_refuses_wake_up_calls_is_asked_once_a_second_at_most(fakes):
    cluster, prov = fakes("cluster"), fakes("prov")
    cluster.capacity = {MODEL: dict(AT_ZERO)}
    cluster.wake_status = 404  # an older capacity application: replica counts, no wake-ups
    with RouterServer(_settings(cluster, {"prov": prov})) as router, router.client() as client:
        assert client.post("/v1/chat/completions", json=chat()).headers["x-openweight-upstream"] == "prov"
        time.sleep(1.5)
    assert 1 <= len(cluster.wakes) <= 3


def test_the_prober_leaves_a_model_at_zero_alone_on_the_direct_path(fakes):
    """A GET on the application of a model with no replica is held by Serve and counted as load (it
    would start a replica): the prober reads the capacity route and probes only models that run."""
    cluster = fakes("cluster", prefixes=("/m1",))
    cluster.capacity = {MODEL: dict(AT_ZERO)}
    settings = make_settings(cluster, router={"probe_interval_s": PROBE_S},
                             cluster_extra={"data_path": "direct", "probe": True})
    with RouterServer(settings) as router:
        assert until(lambda: cluster.capacity_reads >= 4)
        assert cluster.probes == 0 and cluster.wakes == []
        assert router.metric("openweight_upstream_up", upstream="cluster") == 1  # Serve answers: up
        cluster.capacity = {MODEL: dict(RUNNING)}
        assert until(lambda: cluster.probes >= 1)  # GET /m1/v1/models once a replica runs


def test_a_capacity_answer_over_a_mebibyte_is_malformed_and_capacity_stays_unknown(fakes):
    cluster, prov = fakes("cluster"), fakes("prov")
    cluster.capacity = {MODEL: dict(AT_ZERO), "padding": "x" * (1 << 20)}  # at zero, if it were read
    with RouterServer(_settings(cluster, {"prov": prov})) as router, router.client() as client:
        assert until(lambda: cluster.capacity_reads >= 2)
        r = client.post("/v1/chat/completions", json=chat())
        assert r.headers["x-openweight-upstream"] == "cluster"  # routed as without the route
        assert "openweight_cluster_replicas{" not in httpx.get(router.url + "/metrics").text
