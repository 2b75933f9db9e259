"""Shared state: a real redis-server on 127.0.0.1 and two real routers sharing it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml

from router.errors import QuotaExceeded
from router.redis_testing import RedisServer
from router.spend_config import Period, StateConfig
from router.state import SCOPE_KEY, Ask, BudgetCheck
from router.state_redis import RedisState
from router.testing import Behavior, FakeUpstream
from tests.spend_support import (
    BUDGET_KEY,
    COST,
    FREE_KEY,
    RATE_KEY,
    bearer,
    chat_body,
    concurrently,
    keys,
    settings,
    settled,
)
from tests.support import RouterServer

STATE = {"timeout_s": 1.0, "retry_after_error_s": 0.2}
"""Generous for a loaded test machine: a slow answer must not look like Redis failing."""


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@contextlib.contextmanager
def two_routers(providers: dict[str, FakeUpstream], redis_url: str, **kwargs: Any) -> Iterator[list[RouterServer]]:
    state = {**STATE, "redis_url": redis_url, **kwargs.pop("state", {})}
    store = kwargs.pop("keys", None) or keys()
    with RouterServer(settings(providers, state=state, **kwargs), store) as one, \
            RouterServer(settings(providers, state=state, **kwargs), store) as two:
        yield [one, two]


def post(router: RouterServer, key: str, **body: Any) -> httpx.Response:
    return httpx.post(router.url + "/v1/chat/completions", json=chat_body(**body), headers=bearer(key), timeout=30)


def spent_in_redis(server: RedisServer, scope: str, name: str) -> float:
    day = datetime.now(UTC).strftime("%Y-%m-%d")
    with redis.Redis.from_url(server.url) as client:
        return int(client.get(f"{{openweight}}:spent:{scope}:{name}:{day}") or 0) / 1e9


def test_a_key_rate_limit_holds_exactly_across_two_routers(fakes, redis_server):
    provider = fakes("p")
    with two_routers({"p": provider}, redis_server.url) as routers:
        statuses = [post(routers[i % 2], RATE_KEY).status_code for i in range(12)]
        assert sorted(statuses) == [200] * 6 + [429] * 6
        assert statuses[:6] == [200] * 6
        assert sum(r.metric("openweight_requests_total", key="team-rate", status="429") for r in routers) == 6


def test_a_key_budget_stops_it_on_both_routers_and_spend_adds_up(fakes, redis_server):
    provider = fakes("p")
    with two_routers({"p": provider}, redis_server.url) as routers:
        answers = [post(routers[i % 2], BUDGET_KEY) for i in range(8)]
        served = sum(a.status_code == 200 for a in answers)
        assert 3 <= served <= 5
        assert all(a.status_code == 429 and a.json()["error"]["code"] == "insufficient_quota"
                   for a in answers[served:])
        metric = sum(r.metric("openweight_spend_usd_total", key="team-budget") for r in routers)
        assert metric == pytest.approx(served * COST)
        assert settled(lambda: spent_in_redis(redis_server, "key", "team-budget"), served * COST) == \
            pytest.approx(served * COST)
        assert spent_in_redis(redis_server, "provider", "p") == pytest.approx(served * COST)


def test_a_provider_budget_is_shared_by_both_routers(fakes, redis_server):
    first, second = fakes("p1"), fakes("p2")
    budgets = {"p1": {"usd": 0.03, "period": "day"}}
    with two_routers({"p1": first, "p2": second}, redis_server.url, budgets=budgets) as routers:
        served = [post(routers[i % 2], FREE_KEY).headers["x-openweight-upstream"] for i in range(5)]
        assert served == ["p1", "p1", "p2", "p2", "p2"]
        assert sum(r.metric("openweight_fallbacks_total", reason="budget") for r in routers) == 3


def test_concurrent_requests_on_two_routers_overspend_at_most_their_reservations(fakes, redis_server):
    provider = fakes("p", default=Behavior(delay_before_headers_s=0.3))
    body = chat_body(max_tokens=5)
    reservation = (math.ceil(len(json.dumps(body)) / 4) * 1000.0 + 5 * 2000.0) / 1e6
    with two_routers({"p": provider}, redis_server.url) as routers:
        for router in routers:  # 0.034 of 0.05 spent
            assert post(router, BUDGET_KEY, max_tokens=5).status_code == 200
        answers = concurrently([routers[i % 2].url for i in range(50)], BUDGET_KEY, body)
        served = sum(a.status_code == 200 for a in answers)
        assert served >= 1
        assert all(a.json()["error"]["code"] == "insufficient_quota" for a in answers if a.status_code != 200)
        spent = settled(lambda: spent_in_redis(redis_server, "key", "team-budget"), (2 + served) * COST)
        assert spent == pytest.approx((2 + served) * COST)
        assert spent <= 0.05 + reservation


def test_redis_down_fails_open_and_counts_then_sharing_resumes(fakes, redis_server):
    provider = fakes("p")
    with two_routers({"p": provider}, redis_server.url) as routers:
        assert post(routers[0], RATE_KEY).status_code == 200
        redis_server.stop()
        assert [post(routers[i % 2], RATE_KEY).status_code for i in range(4)] == [200] * 4
        assert sum(r.metric("openweight_state_errors_total", operation="admit") for r in routers) == 4
        assert sum(r.metric("openweight_spend_usd_total", key="team-rate") for r in routers) == pytest.approx(5 * COST)
        redis_server.start()  # the same port, empty: every bucket full again
        time.sleep(0.3)  # past retry_after_error_s
        statuses = [post(routers[i % 2], RATE_KEY).status_code for i in range(12)]
        assert sorted(statuses) == [200] * 6 + [429] * 6


def test_redis_down_with_on_error_closed_refuses(fakes, redis_server):
    provider = fakes("p")
    with two_routers({"p": provider}, redis_server.url, state={"on_error": "closed"}) as routers:
        assert post(routers[0], RATE_KEY).status_code == 200
        redis_server.stop()
        refused = post(routers[1], RATE_KEY)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "state_unavailable"
        assert post(routers[1], FREE_KEY).status_code == 200  # nothing to check: no state needed
        assert len(provider.requests) == 2


def test_a_slow_redis_does_not_stall_requests(fakes, redis_server):
    provider = fakes("p")
    with two_routers({"p": provider}, redis_server.url, state={"timeout_s": 0.05}) as routers:
        assert post(routers[0], RATE_KEY).status_code == 200
        blocker = threading.Thread(target=lambda: redis.Redis.from_url(redis_server.url).execute_command(
            "DEBUG", "SLEEP", "1.5"))
        blocker.start()
        time.sleep(0.1)
        try:
            assert post(routers[0], RATE_KEY).status_code == 200
            assert routers[0].metric("openweight_state_errors_total", operation="admit") >= 1
        finally:
            blocker.join()
        time.sleep(0.3)  # past retry_after_error_s
        errors = routers[0].metric("openweight_state_errors_total")
        # The connection whose answer came too late is never reused: the next answers are their own.
        # Redis may run the late admission when it wakes (then a token is spent: 6 - 2 leaves 4).
        statuses = [post(routers[0], RATE_KEY).status_code for _ in range(6)]
        assert statuses.count(200) in (4, 5) and statuses == sorted(statuses)
        assert routers[0].metric("openweight_state_errors_total") == errors


def test_scripts_flushed_from_redis_are_loaded_again(fakes, redis_server):
    provider = fakes("p")
    with two_routers({"p": provider}, redis_server.url) as routers:
        assert post(routers[0], RATE_KEY).status_code == 200
        with redis.Redis.from_url(redis_server.url) as client:
            client.script_flush()
        assert post(routers[0], RATE_KEY).status_code == 200
        assert routers[0].metric("openweight_state_errors_total") == 0


def test_the_redis_password_is_never_logged_or_exported(fakes, caplog):
    provider = fakes("p")
    secret = "s3cret-redis-pass"
    with RedisServer(password=secret) as server:
        wrong = server.url.replace(secret, secret + "-wrong")
        with caplog.at_level(logging.INFO), two_routers({"p": provider}, wrong) as routers:
            answer = post(routers[0], RATE_KEY)
            assert answer.status_code == 200
            exported = httpx.get(routers[0].url + "/metrics").text
            assert routers[0].metric("openweight_state_errors_total") >= 1
        assert secret not in caplog.text + exported + answer.text + str(answer.headers)
        assert "shared state" in caplog.text
        with two_routers({"p": provider}, server.url) as routers:  # the right password: shared again
            statuses = [post(routers[i % 2], RATE_KEY).status_code for i in range(8)]
            assert sorted(statuses) == [200] * 6 + [429] * 2
            assert routers[0].metric("openweight_state_errors_total") == 0


def test_reservations_of_a_router_that_died_expire(redis_server):
    config = StateConfig(redis_url=redis_server.url, timeout_s=1.0, reservation_ttl_s=1)
    check = BudgetCheck(SCOPE_KEY, "k", limit=100, period=Period.DAY, reserve=100)

    async def scenario() -> None:
        state = RedisState(config)
        try:
            assert (await state.admit(Ask("k", None, (check,)), time.time())).holds  # never settled: it "died"
            with pytest.raises(QuotaExceeded):
                await state.admit(Ask("k", None, (check,)), time.time())
            await asyncio.sleep(2.2)  # the reservation's time (1 s) and its slot's (1 s)
            assert (await state.admit(Ask("k", None, (check,)), time.time())).holds
        finally:
            await state.aclose()

    asyncio.run(scenario())


def test_redis_killed_mid_request_the_answer_still_comes_and_is_counted(fakes, redis_server):
    provider = fakes("p", default=Behavior(delay_before_headers_s=0.5))
    with two_routers({"p": provider}, redis_server.url) as routers:
        answers: list[httpx.Response] = []
        worker = threading.Thread(target=lambda: answers.append(post(routers[0], BUDGET_KEY)))
        worker.start()
        while not provider.requests:  # admitted: its reservation is in Redis
            time.sleep(0.01)
        redis_server.stop()
        worker.join()
        assert answers[0].status_code == 200
        assert settled(lambda: routers[0].metric("openweight_state_errors_total", operation="settle"), 1) == 1
        assert routers[0].metric("openweight_spend_usd_total", key="team-budget") == pytest.approx(COST)


def spend_cli(config: dict[str, Any], tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run([sys.executable, "-m", "router.cli", "spend", "--config", str(path), *args],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "OPENWEIGHT_API_KEYS": ""})


def test_openweight_spend_reads_the_shared_state(fakes, redis_server, tmp_path):
    provider = fakes("p")
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text("- {name: team-budget, key: " + BUDGET_KEY + ", budget: {usd: 0.05, period: day}}\n")
    with two_routers({"p": provider}, redis_server.url) as routers:
        for i in range(2):
            assert post(routers[i], BUDGET_KEY).status_code == 200
        assert post(routers[0], FREE_KEY).status_code == 200
        settled(lambda: spent_in_redis(redis_server, "provider", "p"), 3 * COST)
    config = settings({"p": provider}, state={"redis_url": redis_server.url}).model_dump(mode="json")
    config["router"]["auth"]["keys_file"] = str(keys_file)
    done = spend_cli(config, tmp_path, "--json")
    assert done.returncode == 0, done.stderr
    rows = {(r["scope"], r["name"]): r for r in json.loads(done.stdout)["rows"]}
    assert rows[("key", "team-budget")]["day_usd"] == pytest.approx(2 * COST)
    assert rows[("key", "team-budget")]["budget_used"] == pytest.approx(2 * COST / 0.05)
    assert rows[("key", "team-free")]["month_usd"] == pytest.approx(COST)
    assert rows[("provider", "p")]["day_usd"] == pytest.approx(3 * COST)
    table = spend_cli(config, tmp_path)
    assert "team-budget" in table.stdout and "68%" in table.stdout


def test_openweight_spend_with_redis_down_says_so_without_the_password(tmp_path):
    with RedisServer(password="s3cret-pw") as server:
        url = server.url
    config = {"router": {"state": {"redis_url": url}}, "models": {"m1": {}}}
    done = spend_cli(config, tmp_path)
    assert done.returncode == 1 and "cannot read redis://<redacted>@127.0.0.1" in done.stderr
    assert "s3cret-pw" not in done.stdout + done.stderr
