"""Prices, spend, budgets and self-hosted cost with in-process state: real routers, fake upstreams."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import time

import httpx
import pytest

from router.auth import KeyStore
from router.config_file import load_settings
from router.settings import ApiKey, ConfigError
from router.spend_config import Period
from router.state import SCOPE_KEY, SCOPE_PROVIDER, Ask, BudgetCheck, Charge, LocalState
from router.testing import PROMPT_TOKENS, Behavior
from tests.spend_support import (
    BUDGET_KEY,
    COST,
    FREE_KEY,
    bearer,
    chat_body,
    concurrently,
    keys,
    settings,
    settled,
)
from tests.support import MODEL, RouterServer
from tests.test_process import check_config


def test_provider_spend_is_usage_times_price_per_key_and_streams_count(fakes):
    provider = fakes("p")
    with RouterServer(settings({"p": provider}), keys()) as router, router.client() as client:
        assert client.post("/v1/chat/completions", json=chat_body(), headers=bearer(FREE_KEY)).status_code == 200
        streamed = client.post("/v1/chat/completions", json=chat_body(stream=True), headers=bearer(FREE_KEY))
        assert streamed.status_code == 200 and "[DONE]" in streamed.text
        assert client.post("/v1/chat/completions", json=chat_body(), headers=bearer("wrong")).status_code == 401
        spend = lambda: router.metric("openweight_spend_usd_total", model=MODEL, upstream="p", key="team-free")  # noqa: E731
        assert settled(spend, 2 * COST) == pytest.approx(2 * COST)
        assert router.metric("openweight_requests_total", model=MODEL, status="200", key="team-free") == 2
        assert router.metric("openweight_tokens_total", kind="prompt", key="team-free") == 2 * PROMPT_TOKENS
        assert router.metric("openweight_requests_total", status="401", key="none") == 1


def test_an_open_router_counts_the_anonymous_key(fakes):
    provider = fakes("p")
    with RouterServer(settings({"p": provider})) as router, router.client() as client:
        assert client.post("/v1/chat/completions", json=chat_body()).status_code == 200
        assert settled(lambda: router.metric("openweight_spend_usd_total", key="anonymous"), COST) == \
            pytest.approx(COST)
        assert router.metric("openweight_requests_total", key="anonymous") == 1


def test_a_broken_stream_is_charged_its_reservation_estimate(fakes):
    provider = fakes("p")
    provider.script(Behavior(cut_after=2))
    body = json.dumps(chat_body(stream=True, max_tokens=10)).encode()
    with RouterServer(settings({"p": provider}), keys()) as router, router.client() as client:
        r = client.post("/v1/chat/completions", content=body,
                        headers={**bearer(FREE_KEY), "content-type": "application/json"})
        assert r.status_code == 200 and "stream_interrupted" in r.text
        estimate = (math.ceil(len(body) / 4) * 1000.0 + 10 * 2000.0) / 1e6
        assert settled(lambda: router.metric("openweight_spend_usd_total", key="team-free"), estimate) == \
            pytest.approx(estimate)


def test_a_key_past_its_budget_gets_insufficient_quota(fakes):
    provider = fakes("p")
    with RouterServer(settings({"p": provider}), keys(budget_usd=0.05)) as router, router.client() as client:
        answers = [client.post("/v1/chat/completions", json=chat_body(), headers=bearer(BUDGET_KEY))
                   for _ in range(5)]
        assert [a.status_code for a in answers] == [200, 200, 200, 429, 429]  # 3 x 0.017 >= 0.05
        error = answers[3].json()["error"]
        assert error["code"] == "insufficient_quota" and error["type"] == "insufficient_quota"
        assert "team-budget" in error["message"] and BUDGET_KEY not in error["message"]
        assert client.post("/v1/chat/completions", json=chat_body(), headers=bearer(FREE_KEY)).status_code == 200
        assert len(provider.requests) == 4
        assert router.metric("openweight_requests_total", model=MODEL, status="429", key="team-budget") == 2
        assert router.metric("openweight_budget_used_ratio", scope="key", owner="team-budget") == \
            pytest.approx(3 * COST / 0.05)


def test_a_provider_past_its_budget_is_skipped_with_reason_budget(fakes):
    first, second = fakes("p1"), fakes("p2")
    budgets = {"p1": {"usd": 0.03, "period": "day"}}
    with RouterServer(settings({"p1": first, "p2": second}, budgets=budgets), keys()) as router, \
            router.client() as client:
        served = [client.post("/v1/chat/completions", json=chat_body(), headers=bearer(FREE_KEY))
                  .headers["x-openweight-upstream"] for _ in range(4)]
        assert served == ["p1", "p1", "p2", "p2"]
        assert router.metric("openweight_fallbacks_total", from_upstream="p1", to_upstream="p2", reason="budget") == 2
        assert settled(lambda: router.metric("openweight_spend_usd_total", upstream="p1"), 2 * COST) == \
            pytest.approx(2 * COST)
        assert router.metric("openweight_budget_used_ratio", scope="provider", owner="p1") >= 1


def test_concurrent_requests_overspend_at_most_their_reservations(fakes):
    provider = fakes("p", default=Behavior(delay_before_headers_s=0.3))
    body = chat_body(max_tokens=5)  # reservation: the prompt's size + 5 tokens, >= what the fake uses
    reservation = (math.ceil(len(json.dumps(body)) / 4) * 1000.0 + 5 * 2000.0) / 1e6
    with RouterServer(settings({"p": provider}), keys(budget_usd=0.05)) as router, router.client() as client:
        for _ in range(2):  # 0.034 of 0.05 spent
            assert client.post("/v1/chat/completions", json=body, headers=bearer(BUDGET_KEY)).status_code == 200
        answers = concurrently([router.url] * 50, BUDGET_KEY, body)
        served = sum(a.status_code == 200 for a in answers)
        assert served >= 1
        assert all(a.json()["error"]["code"] == "insufficient_quota" for a in answers if a.status_code != 200)
        spent = settled(lambda: router.metric("openweight_spend_usd_total", key="team-budget"), (2 + served) * COST)
        assert spent == pytest.approx((2 + served) * COST)
        assert spent <= 0.05 + reservation


def test_cluster_cost_is_running_replica_hours_times_the_price(fakes):
    cluster = fakes("cluster")
    serve = {"source": "org/model", "replicas": {"min": 2, "max": 2}, "cost_per_replica_hour": 3600.0}
    with RouterServer(settings({}, cluster=cluster, policy="self_hosted_only", serve=serve)) as router:
        start = time.monotonic()
        before = router.metric("openweight_cluster_cost_usd_total", model=MODEL)
        time.sleep(0.3)
        after = router.metric("openweight_cluster_cost_usd_total", model=MODEL)
        elapsed = time.monotonic() - start
        assert 0 < after - before <= 2 * 1.0 * elapsed  # 2 replicas at USD 1 per replica-second
        assert router.metric("openweight_spend_usd_total") == 0


def test_cluster_cost_counts_the_replicas_serve_runs_from_the_capacity_route(fakes):
    """Running and starting replicas (they hold their devices) from the capacity route, not the config's
    floor: an autoscaled model costs what runs, and nothing at zero."""
    cluster = fakes("cluster")
    cluster.capacity = {MODEL: {"running": 3, "starting": 1, "target": 4, "max_ongoing_requests": 8}}
    serve = {"source": "org/model", "replicas": {"min": 0, "max": 4}, "cost_per_replica_hour": 3600.0}
    config = settings({}, cluster=cluster, policy="self_hosted_only", serve=serve)
    config = config.model_copy(update={"router": config.router.model_copy(update={"probe_interval_s": 0.05})})
    with RouterServer(config) as router:
        before = router.metric("openweight_cluster_cost_usd_total", model=MODEL)
        start = time.monotonic()
        time.sleep(0.3)
        after = router.metric("openweight_cluster_cost_usd_total", model=MODEL)
        elapsed = time.monotonic() - start
        assert 4 * 0.3 <= after - before <= 4 * 1.0 * (elapsed + 0.1)  # 4 replicas at USD 1 per replica-second
        cluster.capacity = {MODEL: {"running": 0, "starting": 0, "target": 0, "max_ongoing_requests": 8}}
        assert settled(lambda: router.metric("openweight_cluster_replicas", model=MODEL, state="target"), 0) == 0
        at_zero = router.metric("openweight_cluster_cost_usd_total", model=MODEL)
        time.sleep(0.3)
        assert router.metric("openweight_cluster_cost_usd_total", model=MODEL) == at_zero


@pytest.mark.parametrize(("where", "value", "key"), [
    ("price", -1, "models.m1.fallbacks.0.price.input_per_mtok"),
    ("price", float("nan"), "models.m1.fallbacks.0.price.input_per_mtok"),
    ("price", float("inf"), "models.m1.fallbacks.0.price.input_per_mtok"),
    ("budget", 0, "providers.p.budget.usd"),
    ("budget", float("nan"), "providers.p.budget.usd"),
    ("cost", -2, "models.m1.serve.cost_per_replica_hour"),
    ("cost", float("nan"), "models.m1.serve.cost_per_replica_hour"),
])
def test_bad_prices_budgets_and_costs_name_their_key(tmp_path, where, value, key):
    config = {
        "providers": {"p": {"url": "http://127.0.0.1:9/v1", "budget": {"usd": value if where == "budget" else 1,
                                                                       "period": "day"}}},
        "models": {MODEL: {"serve": {"source": "x", "cost_per_replica_hour": value if where == "cost" else 1},
                           "fallbacks": [{"provider": "p", "model": "x", "price": {
                               "input_per_mtok": value if where == "price" else 1, "output_per_mtok": 1}}]}},
    }
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(config).replace("NaN", ".nan").replace("Infinity", ".inf"))
    with pytest.raises(ConfigError) as raised:
        load_settings(path)
    assert str(raised.value).startswith(key), str(raised.value)


def test_check_config_redacts_the_redis_password(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps({"router": {"state": {"redis_url": "redis://:hunter2-secret@10.0.0.5:6379/0"}},
                                "models": {MODEL: {}}}))
    done = check_config(str(path))
    assert done.returncode == 0, done.stderr
    assert "hunter2" not in done.stdout + done.stderr
    assert "redis://<redacted>@10.0.0.5:6379/0" in done.stdout


def test_local_state_periods_start_again_and_reservations_release():
    state = LocalState()
    day = 1_796_558_400.0  # 2026-12-06 12:00 UTC
    budget = BudgetCheck(SCOPE_KEY, "k", limit=100, period=Period.DAY, reserve=60)
    provider = BudgetCheck(SCOPE_PROVIDER, "p", limit=100, period=Period.MONTH, reserve=60)

    async def scenario() -> None:
        grant = await state.admit(Ask("k", None, (budget, provider)), day)
        assert len(grant.holds) == 2 and not grant.exhausted(SCOPE_PROVIDER)
        second = await state.admit(Ask("k", None, (budget, provider)), day)  # 60 held < 100: admitted
        assert second.holds and second.levels[0].held == 60
        await state.settle([Charge(SCOPE_PROVIDER, "p", 100)], [*grant.holds, *second.holds], day)
        assert (await state.admit(Ask("k", None, (budget, provider)), day)).exhausted(SCOPE_PROVIDER) == {"p"}
        assert await state.spent(SCOPE_PROVIDER, ["p"], Period.DAY, day + 86400) == {"p": 0}
        assert await state.spent(SCOPE_PROVIDER, ["p"], Period.MONTH, day + 86400) == {"p": 100}

    asyncio.run(scenario())


def test_keys_file_budgets_are_validated(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text("- {name: a, key: k1, budget: {usd: -1, period: day}}\n")
    from router.settings import AuthConfig

    with pytest.raises(ConfigError, match=r"keys_file\[0.budget.usd\]"):
        KeyStore.from_config(AuthConfig(keys_file=path))
    path.write_text("- {name: a, key: k1, budget: {usd: 1, period: week}}\n")
    with pytest.raises(ConfigError, match=r"keys_file\[0.budget.period\]"):
        KeyStore.from_config(AuthConfig(keys_file=path))


def test_metrics_show_no_key(fakes):
    provider = fakes("p")
    with RouterServer(settings({"p": provider}), keys()) as router, router.client() as client:
        client.post("/v1/chat/completions", json=chat_body(), headers=bearer(BUDGET_KEY))
        assert BUDGET_KEY not in httpx.get(router.url + "/metrics").text


def test_usage_an_upstream_makes_up_cannot_refund_or_overflow(fakes):
    lying = json.dumps({"id": "x", "object": "chat.completion", "choices": [],
                        "usage": {"prompt_tokens": -10**9, "completion_tokens": 10**400}}).encode()
    provider = fakes("p")
    provider.script(Behavior(body=lying))
    with RouterServer(settings({"p": provider}), keys(budget_usd=0.05)) as router, router.client() as client:
        assert client.post("/v1/chat/completions", json=chat_body(), headers=bearer(BUDGET_KEY)).status_code == 200
        spent = settled(lambda: router.metric("openweight_spend_usd_total", key="team-budget"), 2**53 / 1e9)
        assert 0 < spent <= 2**53 / 1e9
        assert client.post("/v1/chat/completions", json=chat_body(), headers=bearer(BUDGET_KEY)).status_code == 429


def test_a_huge_max_tokens_reserves_at_most_the_cap(fakes):
    provider = fakes("p", default=Behavior(delay_before_headers_s=0.5))
    store = KeyStore([ApiKey(name="big", key="ow-big", budget={"usd": 100.0, "period": "day"})])
    with RouterServer(settings({"p": provider}, state={"max_reserved_tokens": 1000}), store) as router:
        # 1000 tokens at USD 2000 per million: USD 2 reserved, not 2000 x 10^12 / 10^6.
        answers = concurrently([router.url] * 20, "ow-big", chat_body(max_tokens=10**12))
        assert [a.status_code for a in answers] == [200] * 20


def test_openweight_spend_without_shared_state_reads_a_router_metrics(fakes, tmp_path):
    provider = fakes("p")
    with RouterServer(settings({"p": provider}), keys()) as router, router.client() as client:
        for key in (BUDGET_KEY, FREE_KEY, FREE_KEY):
            assert client.post("/v1/chat/completions", json=chat_body(), headers=bearer(key)).status_code == 200
        path = tmp_path / "c.yaml"
        path.write_text(json.dumps({"models": {MODEL: {}}}))
        done = subprocess.run([sys.executable, "-m", "router.cli", "spend", "--config", str(path), "--json",
                               "--url", router.url + "/metrics"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    rows = {(r["scope"], r["name"]): r["since_start_usd"] for r in json.loads(done.stdout)["rows"]}
    expected = {("key", "team-budget"): COST, ("key", "team-free"): 2 * COST, ("provider", "p"): 3 * COST}
    assert rows == pytest.approx(expected)


def test_a_continued_stream_is_charged_at_each_upstream_s_price(fakes):
    """The part that broke at a priced provider is charged its reservation's estimate (its usage never
    came); the continuation at its own usage and price; the unpriced cluster nothing."""
    first = fakes("first", default=Behavior(chunks=6, cut_after=2))
    second = fakes("second")
    base = settings({"first": first, "second": second})
    providers = {n: p.model_copy(update={"continuation": "trailing_assistant"}) for n, p in base.providers.items()}
    with RouterServer(base.model_copy(update={"providers": providers}), keys()) as router, router.client() as c:
        r = c.post("/v1/chat/completions", json=chat_body(stream=True, max_tokens=10), headers=bearer(FREE_KEY))
        assert "error" not in r.text and r.text.endswith("data: [DONE]\n\n")
        spent = lambda upstream: router.metric("openweight_spend_usd_total", upstream=upstream, key="team-free")  # noqa: E731
        assert settled(lambda: spent("second"), COST) == pytest.approx(COST)  # 7 prompt + 5 completion tokens
        assert spent("first") > COST  # the estimate: the body's bytes and max_tokens
