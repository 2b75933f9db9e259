"""Helpers of the deployment checks: tool lookup, chart rendering, PromQL and metric-name extraction."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "openweight"
CACHE = ROOT / ".cache"
NODE_DIR = CACHE / "node"
DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "openweight.rules.yaml"
RULE_TESTS = DEPLOY / "prometheus" / "tests"
DASHBOARDS = sorted((DEPLOY / "grafana").glob("*.json"))
METRIC_NAMES = Path(__file__).with_name("metric_names.txt")

KUBE_VERSION = "1.33.0"
RELEASE = "openweight"
NAMESPACE = "llm"
INSTALL_HINT = "run tools/install-validators.sh"

Doc = dict[str, Any]


def require_tool(name: str) -> str:
    """The path of a validator tool, or a failed test naming the install command."""
    if name == "helm":
        path = CACHE / "bin" / "helm"
        if path.exists():
            return str(path)
    found = shutil.which(name)
    if found:
        return found
    pytest.fail(f"{name} is not installed: {INSTALL_HINT}")


def run(cmd: list[str], cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


# --- The chart -------------------------------------------------------------------------------

def scenarios() -> dict[str, Path | None]:
    """The defaults (None) and every values file under the chart's ci/ folder."""
    found: dict[str, Path | None] = {"defaults": None}
    for path in sorted((CHART / "ci").glob("*.yaml")):
        found[path.stem] = path
    return found


def template_cmd(helm: str, values: Path | None, *extra: str) -> list[str]:
    cmd = [helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION]
    if values is not None:
        cmd += ["--values", str(values)]
    return cmd + list(extra)


def render(helm: str, values: Path | None, *extra: str) -> list[Doc]:
    out = run(template_cmd(helm, values, *extra)).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def render_error(helm: str, *extra: str) -> str:
    """The error of a render that must fail."""
    proc = run(template_cmd(helm, None, *extra), check=False)
    assert proc.returncode != 0, f"rendering with {extra} should fail"
    return proc.stderr


def kind(docs: list[Doc], kind_: str) -> list[Doc]:
    return [d for d in docs if d.get("kind") == kind_]


def one(docs: list[Doc], kind_: str) -> Doc:
    found = kind(docs, kind_)
    assert len(found) == 1, f"expected one {kind_}, got {len(found)}"
    return found[0]


def config_of(docs: list[Doc]) -> dict[str, Any]:
    """The router's config file as the chart renders it."""
    cm = next(d for d in kind(docs, "ConfigMap") if "config.yaml" in d.get("data", {}))
    config = yaml.safe_load(cm["data"]["config.yaml"])
    assert isinstance(config, dict)
    return config


def serve_config_of(docs: list[Doc]) -> dict[str, Any]:
    serve = yaml.safe_load(one(docs, "RayService")["spec"]["serveConfigV2"])
    assert isinstance(serve, dict)
    return serve


def values_of(values: Path | None) -> dict[str, Any]:
    """The chart's values merged with one scenario's file (maps merge, everything else replaces)."""
    merged = yaml.safe_load((CHART / "values.yaml").read_text())

    def merge(into: dict[str, Any], new: dict[str, Any]) -> None:
        for key, value in new.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                merge(into[key], value)
            else:
                into[key] = value

    if values is not None:
        merge(merged, yaml.safe_load(values.read_text()) or {})
    assert isinstance(merged, dict)
    return merged


# --- Prometheus rules and PromQL -------------------------------------------------------------

def rule_groups() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    assert isinstance(groups, list)
    return groups


def rule_exprs() -> list[tuple[str, str]]:
    """(rule name, expression) for every recording and alert rule."""
    return [(r.get("alert") or r["record"], r["expr"]) for g in rule_groups() for r in g["rules"]]


def dashboard_exprs(path: Path) -> list[tuple[str, str]]:
    """(where, expression) for every query of a dashboard: panel targets and template variables."""
    board = json.loads(path.read_text())
    found: list[tuple[str, str]] = []

    def panels(items: list[dict[str, Any]]) -> None:
        for panel in items:
            panels(panel.get("panels", []))
            for target in panel.get("targets", []):
                found.append((f"{path.name}: {panel['title']} [{target['refId']}]", target["expr"]))

    panels(board["panels"])
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            found.append((f"{path.name}: variable {var['name']}", label_values_query(var["query"]["query"])))
    return found


_LABEL_VALUES = re.compile(r"^label_values\((?:(?P<selector>.+),\s*)?(?P<label>\w+)\)$")


def label_values_query(query: str) -> str:
    """The PromQL selector inside a Grafana `label_values(selector, label)` variable query."""
    match = _LABEL_VALUES.match(query.strip())
    assert match and match["selector"], f"unexpected variable query {query!r}"
    return match["selector"]


GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}


def grafana_to_promql(expr: str) -> str:
    """A dashboard query with Grafana's variables replaced, so that promtool can parse it."""
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    return re.sub(r"\$\{?(\w+)\}?", r"\1", expr)


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_NAME = re.compile(r"\b(?:openweight|ray)_[a-zA-Z0-9_:]*|\bup\b")


def metric_names(expr: str) -> set[str]:
    """Series names an expression selects (ours and Ray's; recording-rule names excluded)."""
    code = _STRING.sub('""', expr)
    return {name for name in _NAME.findall(code) if ":" not in name}


def referenced_names() -> set[str]:
    names: set[str] = set()
    for _, expr in rule_exprs():
        names |= metric_names(expr)
    for path in DASHBOARDS:
        for _, expr in dashboard_exprs(path):
            names |= metric_names(grafana_to_promql(expr))
    return names


def expected_names() -> list[str]:
    """The committed list of metric names the rules and dashboards reference."""
    return [line.strip() for line in METRIC_NAMES.read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def sampled_names(exposition: str) -> set[str]:
    """The series names that have at least one sample in a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    return {sample.name for family in text_string_to_metric_families(exposition) for sample in family.samples}


# --- TypeScript and node ---------------------------------------------------------------------

class NodeWorkdir:
    """A scratch folder inside .cache/node (so that its node_modules resolve) for tsc and node."""

    def __enter__(self) -> NodeWorkdir:
        self.tsc_js = NODE_DIR / "node_modules" / "typescript" / "bin" / "tsc"
        if not self.tsc_js.exists():
            pytest.fail(f"typescript is not installed in {NODE_DIR}: {INSTALL_HINT}")
        self.node = require_tool("node")
        self.path = Path(tempfile.mkdtemp(prefix="check-", dir=NODE_DIR))
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def write(self, name: str, text: str) -> Path:
        path = self.path / name
        path.write_text(text)
        return path

    def tsc(self, files: list[str]) -> subprocess.CompletedProcess[str]:
        """Type-check `files` (strict, no output); the result is returned, not asserted."""
        config = {
            "compilerOptions": {
                "strict": True, "noEmit": True, "target": "es2022", "module": "nodenext",
                "moduleResolution": "nodenext", "skipLibCheck": True, "types": [],
            },
            "files": files,
        }
        self.write("tsconfig.json", json.dumps(config))
        return run([self.node, str(self.tsc_js), "-p", str(self.path / "tsconfig.json")], check=False)

    def node_script(self, name: str, text: str, *args: str) -> subprocess.CompletedProcess[str]:
        script = self.write(name, text)
        return run([self.node, str(script), *args], cwd=self.path, check=False)


def env_without_proxies() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
