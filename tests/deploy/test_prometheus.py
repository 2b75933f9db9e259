"""Prometheus rules: `promtool check rules`, the unit tests, and every PromQL expression we ship."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.deploy import support

ALERTS_REQUIRED = {
    "OpenweightRouterDown", "OpenweightHighErrorRatio", "OpenweightHighFallbackRatio", "OpenweightModelUnavailable",
    "OpenweightCircuitOpen", "OpenweightTTFTHigh", "OpenweightServeReplicaUnhealthy", "OpenweightKVCacheNearFull",
}


def test_rules_check(promtool: str) -> None:
    out = support.run([promtool, "check", "rules", str(support.RULES)]).stdout
    assert "SUCCESS" in out


def test_rule_unit_tests(promtool: str) -> None:
    files = sorted(support.RULE_TESTS.glob("*.yaml"))
    assert files
    out = support.run([promtool, "test", "rules", *map(str, files)], cwd=support.RULE_TESTS)
    assert "SUCCESS" in out.stdout and "FAILED" not in out.stdout


def test_every_alert_has_a_unit_test() -> None:
    alerts = {r["alert"] for g in support.rule_groups() for r in g["rules"] if "alert" in r}
    assert alerts >= ALERTS_REQUIRED
    tested: set[str] = set()
    firing: set[str] = set()
    for path in support.RULE_TESTS.glob("*.yaml"):
        for test in yaml.safe_load(path.read_text())["tests"]:
            for case in test.get("alert_rule_test", []):
                tested.add(case["alertname"])
                if case["exp_alerts"]:
                    firing.add(case["alertname"])
    assert alerts == tested, f"alerts without a unit test: {alerts - tested}"
    assert alerts == firing, f"alerts never shown firing in a unit test: {alerts - firing}"


def test_every_alert_has_severity_and_text() -> None:
    for group in support.rule_groups():
        for rule in group["rules"]:
            if "alert" in rule:
                assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
                assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def test_example_prometheus_config(promtool: str) -> None:
    out = support.run([promtool, "check", "config", str(support.DEPLOY / "prometheus" / "prometheus.example.yml")])
    assert "SUCCESS" in out.stdout


def test_example_prometheus_config_scrapes_the_local_stack() -> None:
    """The example's targets are the ports of the local stack: the router of deploy/examples/local.yaml
    and Ray's metrics export port of cluster/stack.py."""
    from cluster.stack import METRICS_EXPORT_PORT

    example = yaml.safe_load((support.DEPLOY / "prometheus" / "prometheus.example.yml").read_text())
    targets = {job["job_name"]: [t for c in job["static_configs"] for t in c["targets"]]
               for job in example["scrape_configs"]}
    router = yaml.safe_load((support.DEPLOY / "examples" / "local.yaml").read_text())["router"]
    assert targets == {
        "openweight-router": [f"{router['host']}:{router['port']}"],
        "openweight-ray": [f"127.0.0.1:{METRICS_EXPORT_PORT}"],
    }


def all_exprs() -> list[tuple[str, str]]:
    exprs = [(f"rule {name}", expr) for name, expr in support.rule_exprs()]
    for path in support.DASHBOARDS:
        exprs += [(where, support.grafana_to_promql(expr)) for where, expr in support.dashboard_exprs(path)]
    return exprs


def test_every_promql_expression_parses(promtool: str, tmp_path: Path) -> None:
    """Each rule and dashboard query, wrapped as a recording rule, passes `promtool check rules`."""
    exprs = all_exprs()
    assert len(exprs) > 50
    rules = [{"record": f"check:expr_{i}", "expr": expr} for i, (_, expr) in enumerate(exprs)]
    path = tmp_path / "exprs.rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "exprs", "rules": rules}]}))
    proc = support.run([promtool, "check", "rules", str(path)], check=False)
    if proc.returncode != 0:
        # Check one by one to name the bad ones.
        bad = []
        for where, expr in exprs:
            path.write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [{"record": "check:x", "expr": expr}]}]}))
            one = support.run([promtool, "check", "rules", str(path)], check=False)
            if one.returncode != 0:
                bad.append(f"{where}: {expr}\n{one.stdout}{one.stderr}")
        pytest.fail("\n".join(bad) or proc.stdout + proc.stderr)


def test_the_parse_check_catches_bad_promql(promtool: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [
        {"record": "check:x", "expr": "sum by (model (rate(openweight_requests_total[5m]))"}]}]}))
    assert support.run([promtool, "check", "rules", str(path)], check=False).returncode != 0
