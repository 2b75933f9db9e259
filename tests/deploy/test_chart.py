"""The Helm chart: lint, render every scenario, validate every object, and check what it promises.

Core kinds are validated strictly against the Kubernetes schemas (kubernetes-validate); the
RayService against a schema of its own fields, with its pod templates validated as core Pods.
Monitoring and Gateway API objects are checked in test_crds.py.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from router.settings import ProviderConfig, Settings
from tests.deploy import support, values_schema
from tests.deploy.support import CHART, KUBE_VERSION, NAMESPACE, RELEASE, Doc

SCENARIOS = list(support.scenarios())
CORE_API_VERSIONS = {"v1", "apps/v1", "policy/v1", "autoscaling/v2", "networking.k8s.io/v1"}
CRD_API_VERSIONS = {"ray.io/v1", "monitoring.coreos.com/v1", "gateway.networking.k8s.io/v1"}
RAY_PORTS = {"gcs-server": 6379, "dashboard": 8265, "client": 10001, "metrics": 8080}
RAYSERVICE_SCHEMA = json.loads(Path(__file__).with_name("rayservice.schema.json").read_text())


def scenario_values(name: str) -> dict[str, Any]:
    return support.values_of(support.scenarios()[name])


def docs_of(rendered: dict[str, list[Doc]], name: str) -> list[Doc]:
    return rendered[name]


# --- Lint and render -------------------------------------------------------------------------

@pytest.mark.parametrize("scenario", SCENARIOS)
def test_lint_strict(helm: str, scenario: str) -> None:
    values = support.scenarios()[scenario]
    cmd = [helm, "lint", str(CHART), "--strict", "--kube-version", KUBE_VERSION, "--namespace", NAMESPACE]
    if values is not None:
        cmd += ["--values", str(values)]
    out = support.run(cmd).stdout
    assert "0 chart(s) failed" in out
    assert "[WARNING]" not in out and "[ERROR]" not in out, out


def test_ci_scenarios_exist() -> None:
    assert {"router-only", "full", "self-hosted-only"} <= set(SCENARIOS)


def test_scenarios_render_what_they_enable(rendered: dict[str, list[Doc]]) -> None:
    kinds = {name: {d["kind"] for d in docs} for name, docs in rendered.items()}
    assert "RayService" not in kinds["router-only"]
    assert {"RayService", "NetworkPolicy", "PersistentVolumeClaim"} <= kinds["defaults"]
    assert {"RayService", "HorizontalPodAutoscaler", "HTTPRoute", "ServiceMonitor", "PodMonitor",
            "PrometheusRule"} <= kinds["full"]
    assert "Ingress" in kinds["router-only"]
    full = support.one(rendered["full"], "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    tp2 = next(g for g in full if g["groupName"] == "gpu-tp2")
    assert tp2["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2


def test_templates_grouped_by_component() -> None:
    templates = CHART / "templates"
    assert {p.name for p in templates.iterdir() if p.is_dir()} == {"router", "cluster", "monitoring"}
    loose = {p.name for p in templates.iterdir() if p.is_file()}
    assert loose <= {"_helpers.tpl", "NOTES.txt"}


# --- Kubernetes schemas ----------------------------------------------------------------------

def test_every_object_has_a_known_api(all_docs: list[tuple[str, Doc]]) -> None:
    for scenario, doc in all_docs:
        assert doc["apiVersion"] in CORE_API_VERSIONS | CRD_API_VERSIONS, (scenario, doc["apiVersion"])
        assert doc["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_core_objects_match_kubernetes_schemas(rendered: dict[str, list[Doc]], scenario: str) -> None:
    checked = 0
    for doc in rendered[scenario]:
        if doc["apiVersion"] in CORE_API_VERSIONS:
            try:
                kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")
            checked += 1
    assert checked >= 5


@pytest.mark.parametrize("scenario", [s for s in SCENARIOS if s != "router-only"])
def test_rayservice_matches_its_schema_and_pods_are_valid(rendered: dict[str, list[Doc]], scenario: str) -> None:
    docs = rendered[scenario]
    if scenario == "external-cluster":
        assert not support.kind(docs, "RayService")
        return
    ray = support.one(docs, "RayService")
    jsonschema.validate(ray, RAYSERVICE_SCHEMA)
    spec = ray["spec"]["rayClusterConfig"]
    templates = [("head", spec["headGroupSpec"]["template"])]
    templates += [(g["groupName"], g["template"]) for g in spec["workerGroupSpecs"]]
    for name, template in templates:
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {**template.get("metadata", {}), "name": f"{ray['metadata']['name']}-{name}"},
               "spec": template["spec"]}
        try:
            kubernetes_validate.validate(pod, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name} pod template: {exc.message} at {list(exc.path)}")


def test_rayservice_shape(rendered: dict[str, list[Doc]]) -> None:
    ray = support.one(rendered["full"], "RayService")
    spec = ray["spec"]["rayClusterConfig"]
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    head_ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert head_ports == {**RAY_PORTS, "serve": 8000}
    env = {e["name"]: e for e in head["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "HF_TOKEN"}
    for group in spec["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        worker = pod["containers"][0]
        assert worker["resources"]["limits"]["nvidia.com/gpu"] >= 1
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
        mounts = {m["name"]: m["mountPath"] for m in worker["volumeMounts"]}
        assert mounts["model-cache"] == "/models" and mounts["dshm"] == "/dev/shm"
        claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
        assert claims == [f"{RELEASE}-model-cache"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


# --- The config file -------------------------------------------------------------------------

@pytest.mark.parametrize("scenario", SCENARIOS)
def test_config_map_is_a_valid_router_config(rendered: dict[str, list[Doc]], scenario: str) -> None:
    config = support.config_of(rendered[scenario])
    assert set(config) == {"router", "cluster", "providers", "models"}
    settings = Settings(**config)
    values = scenario_values(scenario)
    assert settings.providers.keys() == (values["providers"] or {}).keys()
    assert settings.models.keys() == (values["models"] or values["defaultModels"]).keys()
    if values["cluster"]["enabled"]:
        assert settings.cluster.url == f"http://{RELEASE}-ray-serve-svc.{NAMESPACE}.svc:8000/v1"
        assert settings.cluster.enabled
    elif values["cluster"]["url"]:
        assert settings.cluster.url == values["cluster"]["url"].rstrip("/") and settings.cluster.enabled
    else:
        assert not settings.cluster.enabled


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_router_deployment(rendered: dict[str, list[Doc]], scenario: str) -> None:
    docs = rendered[scenario]
    deployment = support.one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["openweight", "router", "--config", "/etc/openweight/config.yaml",
                                    "--host", "0.0.0.0", "--port", "8000"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert pod["topologySpreadConstraints"]
    for constraint in pod["topologySpreadConstraints"]:
        assert constraint["labelSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/etc/openweight"]["readOnly"] is True
    config_volume = next(v for v in pod["volumes"] if v["name"] == mounts["/etc/openweight"]["name"])
    assert config_volume["configMap"]["items"] == [{"key": "config.yaml", "path": "config.yaml"}]
    # One env var per provider key, named as the provider's api_key_env, from a Secret.
    env = {e["name"]: e for e in container.get("env", [])}
    config = support.config_of(docs)
    for provider in config["providers"].values():
        if provider.get("api_key_env"):
            ref = env[provider["api_key_env"]]["valueFrom"]["secretKeyRef"]
            assert ref["optional"] is True
    keys_file = (config["router"].get("auth") or {}).get("keys_file")
    keys_env = (config["router"].get("auth") or {}).get("keys_env", "OPENWEIGHT_API_KEYS")
    if keys_file:
        assert keys_file == "/etc/openweight/keys/keys.yaml"
        assert mounts["/etc/openweight/keys"]["readOnly"] is True
        assert keys_env not in env
    else:
        assert "secretKeyRef" in env[keys_env]["valueFrom"]
    assert support.one(docs, "PodDisruptionBudget")["spec"]["selector"] == deployment["spec"]["selector"]
    if support.kind(docs, "HorizontalPodAutoscaler"):
        assert "replicas" not in deployment["spec"]


def test_router_only_uses_per_provider_secret_override(rendered: dict[str, list[Doc]]) -> None:
    container = support.one(rendered["router-only"], "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
    assert env["GROQ_API_KEY"] == {"name": "groq-credentials", "key": "api-key", "optional": True}
    assert env["TOGETHER_API_KEY"] == {"name": "openweight-provider-keys", "key": "TOGETHER_API_KEY",
                                       "optional": True}
    assert env["OPENWEIGHT_API_KEYS"] == {"name": "openweight-client-keys", "key": "keys"}


def test_config_change_rolls_the_router(helm: str) -> None:
    def checksum(*extra: str) -> str:
        deployment = support.one(support.render(helm, None, *extra), "Deployment")
        return str(deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"])

    assert checksum() != checksum("--set", "router.config.deadline_s=30")


# --- serveConfigV2 ---------------------------------------------------------------------------

CLUSTER_SCENARIOS = [s for s in SCENARIOS if scenario_values(s)["cluster"]["enabled"]]


def openweight_cli(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("openweight", path=str(Path(sys.executable).parent)) or "openweight"
    return support.run([exe, *args], check=False)


@pytest.mark.parametrize("scenario", CLUSTER_SCENARIOS)
def test_serve_config_is_what_the_code_builds(rendered: dict[str, list[Doc]], scenario: str, tmp_path: Path) -> None:
    """serveConfigV2 equals `openweight cluster serve-config` for the same config file; each model's
    `serve` block compared as the cluster side parses it (defaults dropped, as the code writes it)."""
    if importlib.util.find_spec("cluster.builder") is None or importlib.util.find_spec("cluster.cli") is None:
        pytest.skip("`openweight cluster serve-config` is not available (cluster/builder.py, cluster/cli.py)")
    from cluster.config import parse_serve_specs

    docs = rendered[scenario]
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(support.config_of(docs)))
    proc = openweight_cli("cluster", "serve-config", "--config", str(config_file))
    assert proc.returncode == 0, proc.stderr
    expected = yaml.safe_load(proc.stdout)
    chart = support.serve_config_of(docs)
    for app in chart["applications"]:
        if app["import_path"] != "cluster.builder:app_from_args":
            continue  # the capacity application: a list of model ids
        specs = parse_serve_specs(app["args"]["models"])
        app["args"]["models"] = {k: v.model_dump(mode="json", exclude_defaults=True) for k, v in specs.items()}
    assert chart == expected


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_openweight_check_config_accepts_the_config_map(
    rendered: dict[str, list[Doc]], scenario: str, tmp_path: Path
) -> None:
    config = support.config_of(rendered[scenario])
    auth = config["router"].get("auth") or {}
    if auth.get("keys_file"):
        # The keys file is a Secret mounted at run time; check-config reads it, so stand one in.
        keys_file = tmp_path / "keys.yaml"
        keys_file.write_text(yaml.safe_dump([{"name": "ci", "sha256": hashlib.sha256(b"ci").hexdigest()}]))
        auth["keys_file"] = str(keys_file)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    proc = openweight_cli("check-config", str(config_file))
    assert proc.returncode == 0, proc.stderr


def test_serve_config_hosts_the_serve_blocks(rendered: dict[str, list[Doc]]) -> None:
    """The direct data path (default): one application per model, each at the model's route, and
    the capacity application on the Serve port."""
    *apps, capacity = support.serve_config_of(rendered["full"])["applications"]
    assert capacity["import_path"] == "cluster.capacity:app_from_args"
    assert capacity["route_prefix"] == "/openweight/capacity"
    assert all(app["import_path"] == "cluster.builder:app_from_args" for app in apps)
    assert [app["route_prefix"] for app in apps] == ["/qwen-qwen2-5-7b-instruct", "/qwen2-5-14b-instruct"]
    models = {k: v for app in apps for k, v in app["args"]["models"].items()}
    assert set(models) == {"qwen2.5-14b-instruct", "Qwen/Qwen2.5-7B-Instruct"}
    assert models["qwen2.5-14b-instruct"]["tensor_parallel_size"] == 2
    assert capacity["args"]["models"] == sorted(models)


# --- Security --------------------------------------------------------------------------------

def allowed_sources(policy: Doc, port: int, port_names: dict[str, int]) -> list[Any]:
    """The `from` peers of every ingress rule that admits `port` (None: any source)."""
    found: list[Any] = []
    for rule in policy["spec"].get("ingress", []):
        ports = rule.get("ports")
        admits = ports is None or any(
            (p.get("port") == port) or (port_names.get(str(p.get("port"))) == port) for p in ports
        )
        if admits:
            found.append(rule.get("from"))
    return found


def ray_policy(docs: list[Doc]) -> Doc:
    policies = [p for p in support.kind(docs, "NetworkPolicy")
                if p["spec"]["podSelector"].get("matchExpressions")]
    assert len(policies) == 1
    return policies[0]


@pytest.mark.parametrize("scenario", ["defaults", "full", "self-hosted-only"])
def test_network_policy_keeps_ray_ports_inside_the_release(rendered: dict[str, list[Doc]], scenario: str) -> None:
    docs = rendered[scenario]
    policy = ray_policy(docs)
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    ray_selector = policy["spec"]["podSelector"]
    router_selector = support.one(docs, "Deployment")["spec"]["selector"]
    # The operator is admitted in its own namespace only: the dashboard's Jobs API runs code.
    operator = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ray-system"}},
                "podSelector": scenario_values(scenario)["networkPolicy"]["kuberayOperator"]["podSelector"]}
    prometheus = scenario_values(scenario)["networkPolicy"]["prometheus"]
    release_only = [[{"podSelector": ray_selector}]]
    assert allowed_sources(policy, 6379, {}) == release_only
    assert allowed_sources(policy, 10001, {}) == release_only
    assert allowed_sources(policy, 8265, {}) == [*release_only, [operator]]
    assert allowed_sources(policy, 8000, {}) == [*release_only, [{"podSelector": router_selector}], [operator]]
    assert allowed_sources(policy, 8080, {}) == [*release_only, [prometheus]]
    # The selector covers the head and the workers (the labels the RayService pod templates carry).
    ray = support.one(docs, "RayService")["spec"]["rayClusterConfig"]
    templates = [ray["headGroupSpec"]["template"]] + [g["template"] for g in ray["workerGroupSpecs"]]
    for template in templates:
        labels = template["metadata"]["labels"]
        assert all(labels[k] == v for k, v in ray_selector["matchLabels"].items())
        (expression,) = ray_selector["matchExpressions"]
        assert labels[expression["key"]] in expression["values"]


def test_router_network_policy(rendered: dict[str, list[Doc]]) -> None:
    for scenario, docs in rendered.items():
        router = [p for p in support.kind(docs, "NetworkPolicy") if "matchExpressions" not in p["spec"]["podSelector"]]
        assert len(router) == 1, scenario
        for rule in router[0]["spec"]["ingress"]:
            assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]
    full = next(p for p in support.kind(rendered["full"], "NetworkPolicy")
                if "matchExpressions" not in p["spec"]["podSelector"])
    clients, prometheus = full["spec"]["ingress"]
    gateway = {"matchLabels": {"kubernetes.io/metadata.name": "gateway-system"}}
    assert clients["from"] == [{"namespaceSelector": gateway}]
    assert prometheus["from"] == [scenario_values("full")["networkPolicy"]["prometheus"]]


def test_no_ray_port_leaves_the_cluster_network(all_docs: list[tuple[str, Doc]]) -> None:
    ray_ports = set(RAY_PORTS.values()) | {8000}
    for scenario, doc in all_docs:
        if doc["kind"] == "Service" and doc["spec"].get("type", "ClusterIP") in ("LoadBalancer", "NodePort"):
            component = doc["spec"]["selector"].get("app.kubernetes.io/component")
            assert component == "router", (scenario, doc["metadata"]["name"])
        if doc["kind"] == "RayService":
            spec = doc["spec"]
            head = spec["rayClusterConfig"]["headGroupSpec"]
            assert head["serviceType"] == "ClusterIP" and head["enableIngress"] is False, scenario
            assert spec.get("serveService", {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP"
        if doc["kind"] in ("Ingress", "HTTPRoute"):
            text = json.dumps(doc)
            assert "-ray" not in text and not any(f'"number": {p}' in text for p in ray_ports), scenario


def test_router_service_type_change_keeps_ray_private(helm: str) -> None:
    docs = support.render(helm, None, "--set", "router.service.type=LoadBalancer")
    exposed = [d for d in support.kind(docs, "Service") if d["spec"]["type"] != "ClusterIP"]
    assert [d["spec"]["selector"]["app.kubernetes.io/component"] for d in exposed] == ["router"]
    assert [p["port"] for p in exposed[0]["spec"]["ports"]] == [8000]


SECRET_NAME = re.compile(r"(?i)(key|token|secret|password)")


def test_no_plain_secret_values(all_docs: list[tuple[str, Doc]]) -> None:
    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            if "name" in node and ("value" in node or "valueFrom" in node) and SECRET_NAME.search(str(node["name"])):
                assert "value" not in node and "secretKeyRef" in node["valueFrom"], where
            for key, value in node.items():
                walk(value, f"{where}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}[{i}]")

    for scenario, doc in all_docs:
        assert doc["kind"] != "Secret", scenario
        walk(doc, f"{scenario}:{doc['kind']}/{doc['metadata']['name']}")
        if doc["kind"] == "ConfigMap" and "config.yaml" in doc["data"]:
            for provider in yaml.safe_load(doc["data"]["config.yaml"])["providers"].values():
                assert set(provider) <= set(ProviderConfig.model_fields)


@pytest.mark.parametrize("args", [
    ["--set", "providers.p.url=https://p.example/v1", "--set", "providers.p.api_key=sk-canary"],
    ["--set", "providers.p.url=https://p.example/v1", "--set", "providers.p.headers.Authorization=Bearer sk-canary"],
    ["--set", "router.extraEnv[0].name=OPENAI_API_KEY", "--set", "router.extraEnv[0].value=sk-canary"],
])
def test_plain_secrets_are_refused(helm: str, args: list[str]) -> None:
    assert support.render_error(helm, *args)


@pytest.mark.parametrize(("args", "message"), [
    (["--set", "cluster.enabled=false"], "needs a cluster"),
    (["--set", "cluster.config.url=http://x/v1"], "additional properties 'url' not allowed"),
    (["--set", "router.httpRoute.enabled=true"], "parentRefs"),
    (["--set", "router.replcas=3"], "replcas"),
    (["--set", "defaultModels=null"], "at least one model"),
    (["--set", "cluster.serve.routePrefix=/llm/"], "routePrefix"),
    (["--set", "cluster.head.rayStartParams.num-gpus=1", "--set", "cluster.workerGroups[0].name=GPU"], "pattern"),
])
def test_bad_values_fail_at_render_time(helm: str, args: list[str], message: str) -> None:
    assert message in support.render_error(helm, *args)


# --- Monitoring objects in the chart ---------------------------------------------------------

def test_prometheus_rule_is_the_rule_file(rendered: dict[str, list[Doc]]) -> None:
    rule = support.one(rendered["full"], "PrometheusRule")
    assert rule["spec"]["groups"] == support.rule_groups()


def test_dashboards_ship_as_labelled_config_maps(rendered: dict[str, list[Doc]]) -> None:
    maps = [d for d in support.kind(rendered["full"], "ConfigMap") if "grafana_dashboard" in d["metadata"]["labels"]]
    assert {d["metadata"]["labels"]["grafana_dashboard"] for d in maps} == {"1"}
    shipped = {name: json.loads(text) for d in maps for name, text in d["data"].items()}
    assert shipped == {p.name: json.loads(p.read_text()) for p in support.DASHBOARDS}
    assert all(d["metadata"]["annotations"] == {"grafana_folder": "openweight"} for d in maps)


def test_deploy_copies_are_the_chart_files() -> None:
    pairs = [(support.RULES, CHART / "rules" / "openweight.rules.yaml")]
    pairs += [(p, CHART / "dashboards" / p.name) for p in support.DASHBOARDS]
    assert {p.name for p in (CHART / "dashboards").glob("*.json")} == {p.name for p in support.DASHBOARDS}
    for deployed, chart_file in pairs:
        assert deployed.read_bytes() == chart_file.read_bytes(), deployed


def test_monitors_select_the_right_pods(rendered: dict[str, list[Doc]]) -> None:
    docs = rendered["full"]
    service_monitor = support.one(docs, "ServiceMonitor")
    service = next(s for s in support.kind(docs, "Service"))
    assert service_monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert service_monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    pod_monitor = support.one(docs, "PodMonitor")
    assert pod_monitor["spec"]["selector"] == ray_policy(docs)["spec"]["podSelector"]
    assert pod_monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"


# --- Values: schema and documentation ----------------------------------------------------------

def test_values_schema_is_generated_from_the_config_models() -> None:
    committed = (CHART / "values.schema.json").read_text()
    assert committed == values_schema.rendered(), (
        "values.schema.json is stale: run .venv/bin/python -m tests.deploy.values_schema --write"
    )


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_scenario_values_match_the_schema(scenario: str) -> None:
    jsonschema.validate(scenario_values(scenario), values_schema.chart_schema())


_KEY = re.compile(r"^(?P<indent>\s*)(?P<key>[\w.-]+):(?P<rest>.*)$")


def test_every_value_is_documented() -> None:
    """Every key of values.yaml is documented by a `# --` comment on itself or an enclosing key."""
    undocumented: list[str] = []
    stack: list[tuple[int, str, bool]] = []  # (indent, key, documented)
    comment: list[str] = []
    for line in (CHART / "values.yaml").read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            comment.append(stripped)
            continue
        if not stripped:
            comment = []
            continue
        match = _KEY.match(line)
        if not match or stripped.startswith("-"):
            comment = []
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if any(key == "-" for _, key, _ in stack):
            continue
        documented = any(c.startswith("# --") for c in comment) or any(d for _, _, d in stack)
        stack.append((indent, match["key"], documented))
        comment = []
        is_leaf = match["rest"].strip() != ""
        if is_leaf and not documented:
            undocumented.append(".".join(k for _, k, _ in stack))
    assert not undocumented, f"values without a `# --` comment: {undocumented}"


def test_notes_name_the_secrets(helm: str) -> None:
    out = support.run([helm, "install", RELEASE, str(CHART), "--dry-run=client", "--namespace", NAMESPACE,
                       "--values", str(CHART / "ci" / "full.yaml")]).stdout
    notes = out.split("NOTES:", 1)[1]
    assert "secret openweight-keys-file" in notes
    assert "key TOGETHER_API_KEY" in notes and "secret hf-token" in notes
    assert f"http://{RELEASE}-ray-serve-svc.{NAMESPACE}.svc:8000/v1" in notes
