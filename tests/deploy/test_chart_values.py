"""The chart's answer to particular values: what they change in the rendered objects, and which
values it refuses at render time (credentials in serve blocks, replicas no worker group can hold).

Each case renders the defaults plus a few `--set` flags; the scenarios under ci/ are checked in
test_chart.py.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy import support
from tests.deploy.support import NAMESPACE, RELEASE, Doc

SERVE_URL = f"http://{RELEASE}-ray-serve-svc.{NAMESPACE}.svc:8000"


def with_models(models: dict[str, Any]) -> list[str]:
    return ["--set-json", f"models={json.dumps(models)}"]


def served(serve: dict[str, Any]) -> list[str]:
    """Flags for one self-hosted model `m` with this `serve` block."""
    return with_models({"m": {"serve": {"source": "org/model", **serve}}})


# --- The cluster URL follows the route prefix -----------------------------------------------------

CLASSIC = ("--set", "cluster.config.data_path=classic")


@pytest.mark.parametrize(("prefix", "url"), [
    ("/", f"{SERVE_URL}/v1"),
    ("/llm", f"{SERVE_URL}/llm/v1"),
    ("/team/llm", f"{SERVE_URL}/team/llm/v1"),
])
def test_cluster_url_joins_the_route_prefix(helm: str, prefix: str, url: str) -> None:
    docs = support.render(helm, None, "--set", f"cluster.serve.routePrefix={prefix}", *CLASSIC)
    app, capacity = support.serve_config_of(docs)["applications"]
    assert app["route_prefix"] == prefix
    assert capacity["route_prefix"] == "/openweight/capacity"  # on the Serve port, beside any prefix
    assert support.config_of(docs)["cluster"]["url"] == url


@pytest.mark.parametrize("prefix", ["/", "/llm", "/team/llm"])
def test_direct_path_routes_each_model_under_the_route_prefix(helm: str, prefix: str) -> None:
    models = with_models({"a": {"serve": {"source": "org/a"}},
                          "b": {"cluster_model": "Org/B.1", "serve": {"source": "x"}}})
    docs = support.render(helm, None, "--set", f"cluster.serve.routePrefix={prefix}", *models)
    apps = support.serve_config_of(docs)["applications"]
    base = prefix.rstrip("/")
    assert [(a["name"], a["route_prefix"]) for a in apps] == [
        ("org-b-1", f"{base}/org-b-1"), ("a", f"{base}/a"), ("openweight-capacity", "/openweight/capacity")]
    config = support.config_of(docs)
    assert config["cluster"]["url"] == f"{SERVE_URL}{base}/v1" and "data_path" not in config["cluster"]
    pod = support.one(docs, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    assert {"name": "RAY_SERVE_ENABLE_HA_PROXY", "value": "1"} in pod["containers"][0]["env"]


def test_classic_path_keeps_serve_s_python_proxy(helm: str) -> None:
    pod = support.one(support.render(helm, None, *CLASSIC), "RayService")["spec"]["rayClusterConfig"]
    env = pod["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    assert all(e["name"] != "RAY_SERVE_ENABLE_HA_PROXY" for e in env)


@pytest.mark.parametrize("data_path", ["classic", "direct"])
def test_serve_config_cli_writes_the_default_route_prefix(helm: str, tmp_path: Path, data_path: str) -> None:
    """The chart README's claim: serveConfigV2 equals `openweight cluster serve-config` except, on the
    classic path, for the `cluster.serve` fields the command does not take (here the route prefix);
    on the direct path the command derives every route from the cluster URL, as the chart does."""
    docs = support.render(helm, None, "--set", "cluster.serve.routePrefix=/llm",
                          "--set", f"cluster.config.data_path={data_path}")
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(support.config_of(docs)))
    exe = shutil.which("openweight", path=str(Path(sys.executable).parent)) or "openweight"
    written = yaml.safe_load(support.run([exe, "cluster", "serve-config", "--config", str(config_file)]).stdout)
    chart = support.serve_config_of(docs)
    (chart_app, chart_capacity), (cli_app, cli_capacity) = chart["applications"], written["applications"]
    assert chart_capacity == cli_capacity
    if data_path == "classic":
        assert cli_app["route_prefix"] == "/"
        cli_app["route_prefix"] = "/llm"
    else:
        assert cli_app["route_prefix"] == chart_app["route_prefix"] == "/llm/qwen2-5-7b-instruct"
    assert {k: v for k, v in chart_app.items() if k != "args"} == {k: v for k, v in cli_app.items() if k != "args"}
    assert written["http_options"] == chart["http_options"]


# --- No credentials in serve blocks ---------------------------------------------------------------

@pytest.mark.parametrize(("serve", "where"), [
    ({"env": {"HF_TOKEN": "hf_canary"}}, "models.m.serve.env.HF_TOKEN"),
    ({"env": {"HUGGING_FACE_HUB_TOKEN": "hf_canary"}}, "models.m.serve.env.HUGGING_FACE_HUB_TOKEN"),
    ({"env": {"AWS_SECRET_ACCESS_KEY": "canary"}}, "models.m.serve.env.AWS_SECRET_ACCESS_KEY"),
    ({"env": {"WANDB_API_KEY": "canary"}}, "models.m.serve.env.WANDB_API_KEY"),
    ({"env": {"db-password": "canary"}}, "models.m.serve.env.db-password"),
    ({"engine_args": {"hf_token": "hf_canary"}}, "models.m.serve.engine_args.hf_token"),
    ({"engine_args": {"speculative_config": {"apiKey": "canary"}}},
     "models.m.serve.engine_args.speculative_config.apiKey"),
])
def test_credentials_in_serve_blocks_are_refused(helm: str, serve: dict[str, Any], where: str) -> None:
    error = support.render_error(helm, *served(serve))
    assert f"{where}: credentials are never values" in error
    assert "cluster.hfToken.existingSecret" in error and "secretKeyRef" in error
    assert "canary" not in error


def test_engine_args_that_only_look_like_credentials_pass(helm: str) -> None:
    engine_args = {"tokenizer": "org/tok", "tokenizer_mode": "auto", "max_num_batched_tokens": 8192,
                   "kv_cache_dtype": "fp8", "skip_tokenizer_init": False, "hf_token": True,
                   "speculative_config": {"num_speculative_tokens": 3}}
    env = {"TOKENIZERS_PARALLELISM": "false", "VLLM_USE_V1": "1"}
    docs = support.render(helm, None, *served({"engine_args": engine_args, "env": env}))
    serve = support.config_of(docs)["models"]["m"]["serve"]
    assert serve["engine_args"] == engine_args and serve["env"] == env


# --- Every GPU replica fits the worker groups -----------------------------------------------------

GROUP = {"name": "gpu", "gpus": 1, "replicas": 1, "minReplicas": 1, "maxReplicas": 4}


def groups(*specs: dict[str, Any]) -> list[str]:
    return ["--set-json", f"cluster.workerGroups={json.dumps([{**GROUP, **s} for s in specs])}"]


@pytest.mark.parametrize(("args", "message"), [
    (served({"tensor_parallel_size": 8}),
     "models.m.serve.tensor_parallel_size: one replica needs 8 GPUs on one node"),
    (served({"tensor_parallel_size": 4}) + groups({"gpus": 2}, {"name": "big", "gpus": 4, "maxReplicas": 0}),
     "the largest cluster.workerGroups pod has 2; add a worker group with gpus: 4"),
    (served({"tensor_parallel_size": 4, "pipeline_parallel_size": 2}),
     "needs tensor_parallel_size x pipeline_parallel_size = 8 GPUs, but cluster.workerGroups offer 4"),
    (served({"tensor_parallel_size": 1}) + groups({"gpus": 0}), "one replica needs 1 GPUs on one node"),
])
def test_replicas_that_no_worker_group_holds_are_refused(helm: str, args: list[str], message: str) -> None:
    assert message in support.render_error(helm, *args)


@pytest.mark.parametrize("args", [
    served({"tensor_parallel_size": 8}) + groups({"gpus": 1}, {"name": "tp8", "gpus": 8, "replicas": 0,
                                                                "minReplicas": 0, "maxReplicas": 1}),
    # Pipeline stages may span nodes (PACK): four 1-GPU pods hold a TP 2 x PP 2 replica.
    served({"tensor_parallel_size": 2, "pipeline_parallel_size": 2}),
    served({"accelerator": "cpu", "tensor_parallel_size": 4}) + groups({"gpus": 0}),
    [*served({"tensor_parallel_size": 8}), "--set", "cluster.enabled=false", "--set", "cluster.url=http://c/v1"],
])
def test_replicas_that_fit_render(helm: str, args: list[str]) -> None:
    assert support.render(helm, None, *args)


# --- Who reaches Ray's dashboard ----------------------------------------------------------------

OPERATOR_PODS = {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}


def dashboard_peers(docs: list[Doc]) -> list[Any]:
    """The `from` peers of the Ray NetworkPolicy rules that admit the dashboard port (8265)."""
    policy = next(p for p in support.kind(docs, "NetworkPolicy") if p["spec"]["podSelector"].get("matchExpressions"))
    return [peer for rule in policy["spec"]["ingress"] if any(p["port"] == 8265 for p in rule.get("ports", []))
            for peer in rule["from"]]


@pytest.mark.parametrize(("args", "peer"), [
    ([], {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ray-system"}},
          "podSelector": OPERATOR_PODS}),
    (["--set", "networkPolicy.kuberayOperator.namespace=kuberay"],
     {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kuberay"}}, "podSelector": OPERATOR_PODS}),
    # No namespace: a peer without namespaceSelector, i.e. the release's own namespace.
    (["--set", "networkPolicy.kuberayOperator.namespace="], {"podSelector": OPERATOR_PODS}),
    (["--set", "networkPolicy.kuberayOperator.namespaceSelector.matchLabels.team=platform"],
     {"namespaceSelector": {"matchLabels": {"team": "platform"}}, "podSelector": OPERATOR_PODS}),
])
def test_dashboard_admits_the_operator_of_one_namespace(helm: str, args: list[str], peer: dict[str, Any]) -> None:
    peers = dashboard_peers(support.render(helm, None, *args))
    assert peer in peers
    assert all(p.get("namespaceSelector") != {} for p in peers), peers


# --- What the Ingress and HTTPRoute publish ------------------------------------------------------

PUBLIC_ROUTES = ["--set", "router.ingress.enabled=true", "--set", "router.httpRoute.enabled=true",
                 "--set", "router.httpRoute.parentRefs[0].name=public"]


def published(docs: list[Doc]) -> list[tuple[str, str]]:
    """(match type, path) of every Ingress path and HTTPRoute path match."""
    found = [(p["pathType"], p["path"]) for d in support.kind(docs, "Ingress")
             for rule in d["spec"]["rules"] for p in rule["http"]["paths"]]
    found += [(m["path"]["type"], m["path"]["value"]) for d in support.kind(docs, "HTTPRoute")
              for rule in d["spec"]["rules"] for m in rule["matches"]]
    return found


def routes(match: str, path: str, request: str) -> bool:
    if match in ("Exact", "ImplementationSpecific"):
        return request == path
    prefix = path.rstrip("/")
    return request == prefix or request.startswith(prefix + "/")


def test_public_routes_default_to_the_api(helm: str) -> None:
    docs = support.render(helm, None, *PUBLIC_ROUTES)
    assert sorted(published(docs)) == [("PathPrefix", "/v1"), ("Prefix", "/v1")]


@pytest.mark.parametrize("scenario", list(support.scenarios()))
def test_unauthenticated_endpoints_stay_private(helm: str, scenario: str) -> None:
    docs = support.render(helm, support.scenarios()[scenario], *PUBLIC_ROUTES)
    paths = published(docs)
    assert paths
    for request in ("/metrics", "/readyz", "/healthz"):
        assert not any(routes(match, path, request) for match, path in paths), (request, paths)
    assert all(routes(match, path, "/v1/chat/completions") for match, path in paths), paths


# --- Readiness ----------------------------------------------------------------------------------

def test_readiness_path_is_a_value(helm: str) -> None:
    def probe(*args: str) -> dict[str, Any]:
        pod = support.one(support.render(helm, None, *args), "Deployment")["spec"]["template"]["spec"]
        found: dict[str, Any] = pod["containers"][0]["readinessProbe"]
        return found

    assert probe()["httpGet"] == {"path": "/readyz", "port": "http"}
    healthz = probe("--set", "router.readinessProbe.httpGet.path=/healthz")
    assert healthz == {**probe(), "httpGet": {"path": "/healthz", "port": "http"}}


# --- Shared state: limits that hold across router replicas ------------------------------------

KEYS_FILE = ["--set", "router.apiKeys.keysFile.existingSecret=keys"]
REDIS = ["--set", "router.state.redisUrl.existingSecret=redis", "--set", "router.state.redisUrl.secretKey=url"]
PROVIDER_BUDGET = ["--set", "providers.p.url=https://p.example/v1", "--set", "providers.p.budget.usd=10",
                   "--set", "providers.p.budget.period=day"]


@pytest.mark.parametrize("args", [
    KEYS_FILE,  # a keys file may carry rate limits and budgets: two replicas by default
    [*KEYS_FILE, "--set", "router.replicas=1", "--set", "router.autoscaling.enabled=true"],
    ["--set", "router.state.keysHaveLimits=true", "--set", "router.replicas=3"],
    PROVIDER_BUDGET,
])
def test_several_replicas_with_limits_need_shared_state(helm: str, args: list[str]) -> None:
    error = support.render_error(helm, *args)
    assert "router.state.redisUrl.existingSecret" in error and "per replica" in error


@pytest.mark.parametrize("args", [
    [*KEYS_FILE, *REDIS],
    [*PROVIDER_BUDGET, *REDIS],
    [*KEYS_FILE, "--set", "router.replicas=1"],
    [*KEYS_FILE, "--set", "router.state.keysHaveLimits=false"],
    [],  # keys from the environment variable carry no limits
])
def test_limits_render_with_shared_state_or_one_replica(helm: str, args: list[str]) -> None:
    docs = support.render(helm, None, *args)
    container = support.one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container.get("env") or []}
    if "router.state.redisUrl.existingSecret=redis" in args:
        ref = env["OPENWEIGHT_ROUTER__STATE__REDIS_URL"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "redis", "key": "url"}
    else:
        assert "OPENWEIGHT_ROUTER__STATE__REDIS_URL" not in env


def test_a_redis_url_in_the_config_map_is_refused(helm: str) -> None:
    error = support.render_error(helm, "--set", "router.config.state.redis_url=redis://:pw@r:6379/0")
    assert "router.state.redisUrl.existingSecret" in error and "pw@" not in error
