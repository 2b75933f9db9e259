"""A real Prometheus server scrapes a running router and evaluates the shipped rules.

The router's cluster is a fake that answers 503 to everything, so every request falls back to
the provider: OpenweightHighFallbackRatio must fire for the model; when the provider fails too,
OpenweightModelUnavailable must fire (every upstream of the model is down). The rules are the shipped file
with every `for:` shortened to 0s (the expressions are unchanged), scraped and evaluated each
second.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from router.testing import Behavior, FakeUpstream
from tests.deploy import support
from tests.deploy.live import Prometheus, Router, wait_until
from tests.deploy.test_metric_names import router_config


@pytest.fixture(scope="module")
def prometheus_binary() -> str:
    return support.require_tool("prometheus")


def fast_rules(path: Path) -> Path:
    groups = support.rule_groups()
    for group in groups:
        group["interval"] = "1s"
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = "0s"
    path.write_text(yaml.safe_dump({"groups": groups}))
    return path


def scrape_config(router: Router, rules: Path) -> dict[str, Any]:
    return {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
        "rule_files": [str(rules)],
        "scrape_configs": [{"job_name": "openweight-router",
                            "static_configs": [{"targets": [f"127.0.0.1:{router.port}"]}]}],
    }


def firing(prometheus: Prometheus, name: str) -> list[dict[str, Any]]:
    alerts = prometheus.api("alerts")["alerts"]
    return [a for a in alerts if a["labels"]["alertname"] == name and a["state"] == "firing"]


@pytest.mark.parametrize(("provider_status", "alert", "quiet"), [
    (200, "OpenweightHighFallbackRatio", "OpenweightModelUnavailable"),
    (500, "OpenweightModelUnavailable", "OpenweightRouterDown"),
])
def test_alert_fires_from_a_real_scrape(
    prometheus_binary: str, tmp_path: Path, provider_status: int, alert: str, quiet: str
) -> None:
    stop = threading.Event()
    with (FakeUpstream("cluster", default=Behavior(status=503)) as cluster,
          FakeUpstream("p", default=Behavior(status=provider_status)) as provider,
          Router(router_config(cluster, provider), tmp_path) as router):

        def traffic() -> None:
            while not stop.is_set():
                router.chat("m")
                stop.wait(0.2)

        sender = threading.Thread(target=traffic, daemon=True)
        sender.start()
        try:
            with Prometheus(prometheus_binary, scrape_config(router, fast_rules(tmp_path / "rules.yaml")),
                            tmp_path) as prometheus:
                wait_until(lambda: any(t["health"] == "up" for t in prometheus.api("targets")["activeTargets"]),
                           30, "the router target to be up")
                groups = prometheus.api("rules")["groups"]
                assert {g["name"] for g in groups} == {g["name"] for g in support.rule_groups()}
                assert all(r["health"] != "err" for g in groups for r in g["rules"])

                alerts = wait_until(lambda: firing(prometheus, alert), 60, f"{alert} to fire")
                assert [a["labels"]["model"] for a in alerts] == ["m"]
                ratio = wait_until(lambda: prometheus.api("query", query="model:openweight_fallbacks:ratio_rate5m")
                                   ["result"], 30, "the fallback ratio to be recorded")
                assert float(ratio[0]["value"][1]) >= 0.8
                assert not firing(prometheus, "OpenweightRouterDown")
                assert not firing(prometheus, quiet)
        finally:
            stop.set()
            sender.join(10)
    assert len(provider.requests) >= 3 and cluster.requests
