"""Grafana dashboards against Grafana's published schema (npm @grafana/schema), with `tsc --strict`.

No Grafana server can run here. Each dashboard becomes TypeScript object literals typed with the
schema's types: the dashboard itself as `Dashboard`, and every panel with its own plugin's
`Options`/`FieldConfig` (timeseries, stat, state-timeline) and Prometheus queries. Object literals
get excess-property checks, so unknown or misspelt fields fail as well as wrong types. Grafana's
string enums (e.g. ThresholdsMode) are compared by their values, as they appear in JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.deploy import support

PANELCFG = "@grafana/schema/dist/esm/raw/composable/{0}/panelcfg/x/{1}PanelCfg_types.gen"
PANEL_TYPES = {
    "timeseries": ("TimeSeries", PANELCFG.format("timeseries", "TimeSeries"), True),
    "stat": ("Stat", PANELCFG.format("stat", "Stat"), False),
    "state-timeline": ("StateTimeline", PANELCFG.format("statetimeline", "StateTimeline"), True),
}

PRELUDE = """\
import type { Dashboard, Panel, RowPanel, FieldConfig, FieldConfigSource, DataQuery } from "@grafana/schema";
@@IMPORTS@@

/** JSON as written: string enums by value (`${Enum}`), everything else as declared. */
type Json<T> = 0 extends 1 & T
  ? T
  : T extends string
    ? string extends T ? T : `${T}`
    : T extends number | boolean | null | undefined
      ? T
      : T extends readonly (infer U)[]
        ? Json<U>[]
        : T extends object
          ? { [K in keyof T]: Json<T[K]> }
          : T;

/** A Prometheus query target. */
interface PromQuery extends Omit<DataQuery, "datasource"> {
  datasource: { type: "prometheus"; uid: string };
  expr: string;
  legendFormat?: string;
  range?: boolean;
  instant?: boolean;
  editorMode?: "code" | "builder";
  format?: "time_series" | "table" | "heatmap";
  interval?: string;
  exemplar?: boolean;
}

type PanelOf<O, F> = Json<Omit<Panel, "options" | "fieldConfig" | "targets">> & {
  options?: Json<O>;
  fieldConfig?: Json<Omit<FieldConfigSource, "defaults">> & {
    defaults: Json<Omit<FieldConfig, "custom">> & { custom?: Json<F> };
  };
  targets: PromQuery[];
};

type Board = Json<Omit<Dashboard, "panels">> & { panels: unknown[] };
"""


def typescript_for(board: dict[str, Any]) -> str:
    imports = [f'import type * as {name} from "{module}";' for name, module, _ in PANEL_TYPES.values()]
    lines = [PRELUDE.replace("@@IMPORTS@@", "\n".join(imports))]
    lines.append(f"export const dashboard: Board = {json.dumps({**board, 'panels': []}, indent=2)};")

    def panels(items: list[dict[str, Any]]) -> None:
        for panel in items:
            ident = f"panel{panel['id']}"
            if panel["type"] == "row":
                lines.append(f"export const {ident}: Json<RowPanel> = {json.dumps(panel, indent=2)};")
                panels(panel.get("panels", []))
                continue
            assert panel["type"] in PANEL_TYPES, f"{panel['title']}: no schema check for type {panel['type']}"
            name, _, has_field_config = PANEL_TYPES[panel["type"]]
            field_config = f"{name}.FieldConfig" if has_field_config else "Record<string, never>"
            lines.append(f"// {panel['title']}")
            lines.append(f"export const {ident}: PanelOf<{name}.Options, {field_config}> = "
                         f"{json.dumps(panel, indent=2)};")

    panels(board["panels"])
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("path", support.DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_matches_grafana_schema(path: Path, node_workdir: support.NodeWorkdir) -> None:
    node_workdir.write("dashboard.ts", typescript_for(json.loads(path.read_text())))
    result = node_workdir.tsc(["dashboard.ts"])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("mutation", ["unknown panel field", "bad threshold mode", "bad legend placement"])
def test_the_schema_check_catches_mistakes(mutation: str, node_workdir: support.NodeWorkdir) -> None:
    board = json.loads((support.DEPLOY / "grafana" / "openweight-router.json").read_text())
    panel = next(p for p in board["panels"] if p["type"] == "stat")
    series = next(p for p in board["panels"] if p["type"] == "timeseries")
    if mutation == "unknown panel field":
        panel["titel"] = "typo"
    elif mutation == "bad threshold mode":
        panel["fieldConfig"]["defaults"]["thresholds"]["mode"] = "relative"
    else:
        series["options"]["legend"]["placement"] = "middle"
    node_workdir.write("dashboard.ts", typescript_for(board))
    assert node_workdir.tsc(["dashboard.ts"]).returncode != 0


@pytest.mark.parametrize("path", support.DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_is_templated(path: Path) -> None:
    board = json.loads(path.read_text())
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert "model" in variables
    ids = []

    def walk(items: list[dict[str, Any]]) -> None:
        for panel in items:
            ids.append(panel["id"])
            walk(panel.get("panels", []))
            if panel["type"] != "row":
                assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
                for target in panel["targets"]:
                    assert target["datasource"] == panel["datasource"]

    walk(board["panels"])
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert board["uid"].startswith("openweight-")


def test_router_dashboard_covers_the_issue() -> None:
    board = json.loads((support.DEPLOY / "grafana" / "openweight-router.json").read_text())
    text = json.dumps(board)
    assert {"model", "upstream"} <= {v["name"] for v in board["templating"]["list"]}
    for name in ("openweight_requests_total", "openweight_fallbacks_total",
                 "openweight_time_to_first_token_seconds_bucket",
                 "openweight_request_duration_seconds_bucket", "openweight_in_flight_requests",
                 "openweight_circuit_state", "openweight_tokens_total", "openweight_router_overhead_seconds_bucket"):
        assert name in text, name


def test_cluster_dashboard_covers_the_issue() -> None:
    text = (support.DEPLOY / "grafana" / "openweight-cluster.json").read_text()
    for name in ("ray_vllm_num_requests_running", "ray_vllm_num_requests_waiting", "ray_vllm_kv_cache_usage_perc",
                 "ray_vllm_time_to_first_token_seconds_bucket", "ray_vllm_inter_token_latency_seconds_bucket",
                 "ray_vllm_generation_tokens_total", "ray_vllm_request_num_preemptions_sum",
                 "ray_serve_deployment_replica_healthy", "ray_serve_deployment_queued_queries",
                 "ray_serve_num_http_error_requests_total", "ray_serve_http_request_latency_ms_bucket"):
        assert name in text, name
