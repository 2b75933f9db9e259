"""Capacity-aware routing decisions (pure): the policy reading a snapshot with replica counts."""

from __future__ import annotations

import pytest

from router.capacity import ModelCapacity, capacity_url, parse_capacity
from router.health import CircuitState, HealthSnapshot, UpstreamHealth
from router.policy import Skip, Target, plan
from router.settings import Settings

_HEALTHY = UpstreamHealth(CircuitState.CLOSED, False, None)
AT_ZERO = ModelCapacity(running=0, starting=0, target=0, max_ongoing_requests=4)
STARTING = ModelCapacity(running=0, starting=1, target=1, max_ongoing_requests=4)
RUNNING = ModelCapacity(running=1, starting=0, target=1, max_ongoing_requests=4)


def _settings(policy: str = "self_hosted_first", providers: int = 1) -> Settings:
    names = [f"p{i}" for i in range(providers)]
    return Settings(
        providers={n: {"url": f"http://{n}/v1"} for n in names},
        models={"m": {"policy": policy, "fallbacks": [{"provider": n, "model": f"{n}-id"} for n in names]}},
    )


def _snapshot(capacity: ModelCapacity | None, in_flight: int = 0) -> HealthSnapshot:
    upstreams = {"cluster": _HEALTHY, "p0": _HEALTHY, "p1": _HEALTHY}
    return HealthSnapshot(upstreams, in_flight, {"m": in_flight}, {} if capacity is None else {"m": capacity})


@pytest.mark.parametrize("capacity", [AT_ZERO, STARTING], ids=["at-zero", "starting"])
def test_a_model_with_no_running_replica_goes_to_providers_first_with_reason_cold_start(capacity):
    result = plan(_settings(), "m", _snapshot(capacity))
    assert result.steps == (Skip(Target("cluster", "m"), "cold_start"), Target("p0", "p0-id"), Target("cluster", "m"))
    assert result.cold and not result.waits_for_replica


@pytest.mark.parametrize("capacity", [RUNNING, None], ids=["running", "capacity-unknown"])
def test_a_running_replica_or_unknown_capacity_routes_as_without_capacity(capacity):
    result = plan(_settings(), "m", _snapshot(capacity))
    assert result.steps == (Target("cluster", "m"), Target("p0", "p0-id"))
    assert not result.cold


@pytest.mark.parametrize(("policy", "providers"), [("self_hosted_only", 1), ("self_hosted_first", 0)])
def test_with_no_provider_a_cold_model_waits_for_its_replica(policy, providers):
    result = plan(_settings(policy, providers), "m", _snapshot(AT_ZERO))
    assert result.steps == (Target("cluster", "m"),)
    assert result.cold and result.waits_for_replica
    assert not plan(_settings(policy, providers), "m", _snapshot(RUNNING)).waits_for_replica


def test_provider_policies_are_not_counted_as_cold_start_fallbacks():
    assert plan(_settings("provider_first"), "m", _snapshot(AT_ZERO)).steps == (
        Target("p0", "p0-id"), Target("cluster", "m"))
    assert not plan(_settings("provider_only"), "m", _snapshot(AT_ZERO)).cold


def test_spillover_moves_to_providers_once_the_running_replicas_are_full():
    settings = _settings("spillover")
    two = ModelCapacity(running=2, starting=0, target=2, max_ongoing_requests=4)
    assert plan(settings, "m", _snapshot(two, in_flight=7)).targets[0].upstream == "cluster"
    full = plan(settings, "m", _snapshot(two, in_flight=8))
    assert full.steps[0] == Skip(Target("cluster", "m"), "spillover")
    assert [t.upstream for t in full.targets] == ["p0", "cluster"]
    assert plan(settings, "m", _snapshot(AT_ZERO)).steps[0] == Skip(Target("cluster", "m"), "cold_start")


def test_the_route_s_answer_is_keyed_by_public_name_and_checked():
    payload = {"models": {"org/m-id": {"running": 1, "starting": 2, "target": 3, "max_ongoing_requests": 8},
                          "other": {"running": 0, "starting": 0, "target": 0}}}
    assert parse_capacity(payload, {"org/m-id": "m"}) == {"m": ModelCapacity(1, 2, 3, 8)}
    for bad in ({}, {"models": []}, {"models": {"org/m-id": {"running": -1, "starting": 0, "target": 0}}},
                {"models": {"org/m-id": {"running": True, "starting": 0, "target": 0}}}):
        with pytest.raises(ValueError):
            parse_capacity(bad, {"org/m-id": "m"})


def test_the_capacity_route_is_on_the_serve_port_of_cluster_url():
    settings = Settings(cluster={"url": "http://ray-head:8000/v1"}, models={"m": {}})
    assert capacity_url(settings.cluster) == "http://ray-head:8000/openweight/capacity"
