"""Custom resources the chart renders, against their published schemas.

ServiceMonitor, PodMonitor and PrometheusRule against prometheus-operator's CRD schemas, HTTPRoute
against Gateway API's (npm @kubernetes-models/*): once with the packages' runtime validators
(types, enums, patterns, required fields) and once through their TypeScript types under
`tsc --strict`, which also rejects unknown fields. The RayService has no published schema; see
test_chart.py.
"""

from __future__ import annotations

import json

import pytest

from tests.deploy import support
from tests.deploy.support import Doc

PROMETHEUS_OPERATOR = "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/"
GATEWAY_API = "@kubernetes-models/gateway-api/gateway.networking.k8s.io/v1/"
MODELS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): PROMETHEUS_OPERATOR + "ServiceMonitor",
    ("monitoring.coreos.com/v1", "PodMonitor"): PROMETHEUS_OPERATOR + "PodMonitor",
    ("monitoring.coreos.com/v1", "PrometheusRule"): PROMETHEUS_OPERATOR + "PrometheusRule",
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): GATEWAY_API + "HTTPRoute",
}

VALIDATE_JS = """
import { readFileSync } from "node:fs";
const docs = JSON.parse(readFileSync(process.argv[2], "utf8"));
let failed = 0;
for (const { module, doc, where } of docs) {
  const exports = await import(module);
  const Model = exports[doc.kind];
  try {
    new Model(doc).validate();
  } catch (err) {
    failed += 1;
    console.log(`${where}: ${err.message}`);
  }
}
console.log(`validated ${docs.length}`);
process.exit(failed ? 1 : 0);
"""


def custom_resources(all_docs: list[tuple[str, Doc]]) -> list[tuple[str, Doc]]:
    return [(s, d) for s, d in all_docs if (d["apiVersion"], d["kind"]) in MODELS]


def test_every_custom_kind_is_rendered_somewhere(all_docs: list[tuple[str, Doc]]) -> None:
    assert {(d["apiVersion"], d["kind"]) for _, d in custom_resources(all_docs)} == set(MODELS)


def test_custom_resources_pass_the_runtime_validators(
    all_docs: list[tuple[str, Doc]], node_workdir: support.NodeWorkdir
) -> None:
    entries = [{"module": MODELS[(d["apiVersion"], d["kind"])], "doc": d,
                "where": f"{s}: {d['kind']}/{d['metadata']['name']}"} for s, d in custom_resources(all_docs)]
    node_workdir.write("docs.json", json.dumps(entries))
    result = node_workdir.node_script("validate.mjs", VALIDATE_JS, str(node_workdir.path / "docs.json"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"validated {len(entries)}" in result.stdout


def test_custom_resources_have_no_unknown_fields(
    all_docs: list[tuple[str, Doc]], node_workdir: support.NodeWorkdir
) -> None:
    lines = []
    for module, kind in sorted({(MODELS[(d["apiVersion"], d["kind"])], d["kind"])
                                for _, d in custom_resources(all_docs)}):
        lines.append(f'import type {{ I{kind} }} from "{module}";')
    for i, (scenario, doc) in enumerate(custom_resources(all_docs)):
        lines.append(f"// {scenario}: {doc['kind']}/{doc['metadata']['name']}")
        lines.append(f"export const doc{i}: I{doc['kind']} = {json.dumps(doc, indent=2)};")
    node_workdir.write("package.json", json.dumps({"type": "module", "private": True}))
    node_workdir.write("resources.ts", "\n".join(lines) + "\n")
    result = node_workdir.tsc(["resources.ts"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_type_check_catches_an_unknown_field(node_workdir: support.NodeWorkdir) -> None:
    module = MODELS[("monitoring.coreos.com/v1", "ServiceMonitor")]
    bad = {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor", "metadata": {"name": "x"},
           "spec": {"selector": {}, "endpoints": [{"port": "http", "intervall": "30s"}]}}
    node_workdir.write("package.json", json.dumps({"type": "module", "private": True}))
    node_workdir.write("bad.ts", f'import type {{ IServiceMonitor }} from "{module}";\n'
                                 f"export const bad: IServiceMonitor = {json.dumps(bad)};\n")
    result = node_workdir.tsc(["bad.ts"])
    assert result.returncode != 0 and "intervall" in result.stdout


@pytest.mark.parametrize("kind", ["ServiceMonitor", "PodMonitor"])
def test_monitors_set_the_job_names_the_rules_use(rendered: dict[str, list[Doc]], kind: str) -> None:
    monitor = support.one(rendered["full"], kind)
    endpoint = (monitor["spec"].get("endpoints") or monitor["spec"]["podMetricsEndpoints"])[0]
    job = next(r["replacement"] for r in endpoint["relabelings"] if r["targetLabel"] == "job")
    assert job == {"ServiceMonitor": "openweight-router", "PodMonitor": "openweight-ray"}[kind]
    if kind == "ServiceMonitor":
        assert 'job="openweight-router"' in support.RULES.read_text()
