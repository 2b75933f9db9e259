"""The cluster's direct data path: one route per model, derived from the one cluster.url.

Real routers against fake upstreams on 127.0.0.1 that serve the API only under the routes the
cluster would give each model (as Serve's HAProxy does), so a request sent anywhere else gets a 404.
"""

from __future__ import annotations

import pytest

from router.cluster_routes import DataPath, model_base_url, route_prefix, slug, slug_conflicts
from router.config_file import load_settings
from router.settings import ConfigError, Settings
from tests.support import RouterServer, chat, make_settings

ODD_ID = "Org/Model.2 beta%2e%2e"
"""A model id with a slash, dots, a space and a percent-escape: each must stay inside its own route."""


def direct_settings(url: str, *models: str, **cluster: object) -> Settings:
    settings = make_settings(url, cluster_extra={"data_path": "direct", **cluster})
    return settings.model_copy(update={"models": {m: settings.models["m1"] for m in models}})


@pytest.mark.parametrize(
    ("model_id", "expected"),
    [("smollm2-135m-instruct", "smollm2-135m-instruct"), ("Qwen/Qwen2.5-7B-Instruct", "qwen-qwen2-5-7b-instruct"),
     ("../../admin", "admin"), ("%2e%2e/%2F", "2e-2e-2f"), ("a\u00e9b", "a-b"), (ODD_ID, "org-model-2-beta-2e-2e")],
)
def test_a_slug_is_letters_digits_and_dashes_whatever_the_model_id(model_id: str, expected: str) -> None:
    assert slug(model_id) == expected


@pytest.mark.parametrize("model_id", ["..", "/", "\u00e9\u00e8", " "])
def test_a_model_id_without_a_letter_or_digit_has_no_route(model_id: str) -> None:
    with pytest.raises(ValueError, match="no letter or digit"):
        slug(model_id)


def test_the_model_base_keeps_the_cluster_url_s_host_and_prefix() -> None:
    assert model_base_url("http://ray:8000/v1", "Qwen/Q", DataPath.DIRECT) == "http://ray:8000/qwen-q/v1"
    assert model_base_url("https://h/llm/v1/", "m", DataPath.DIRECT) == "https://h/llm/m/v1"
    assert route_prefix("http://ray:8000/llm/v1", "../x") == "/llm/x"
    assert model_base_url("http://ray:8000/llm/v1", "m", DataPath.CLASSIC) == "http://ray:8000/llm/v1"


def test_ids_that_share_a_route_are_named() -> None:
    assert slug_conflicts(["a/b", "a-b", "c", "c"]) == [
        "model ids 'a/b', 'a-b' share the route /a-b: rename one (cluster_model)"
    ]


def test_config_errors_name_the_key(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("cluster: {url: 'http://ray:8000/openai'}\nmodels: {m: {}}\n")
    with pytest.raises(ConfigError, match=r"cluster: url: must end with /v1 on the direct data path"):
        load_settings(path)
    path.write_text("cluster: {url: 'http://ray:8000/v1'}\n"
                    "models: {a: {cluster_model: 'x/y'}, b: {cluster_model: X.Y}}\n")
    with pytest.raises(ConfigError, match=r"models: model ids 'x/y', 'X.Y' share the route /x-y"):
        load_settings(path)
    path.write_text("cluster: {url: 'http://ray:8000/openai', data_path: classic}\n"
                    "models: {a: {}, b: {cluster_model: a}}\n")
    assert load_settings(path).cluster_base_url("a") == "http://ray:8000/openai"


def test_each_model_goes_to_its_own_route_and_the_probe_checks_them(fakes) -> None:
    cluster = fakes("cluster", prefixes=("/m1", "/" + slug(ODD_ID)))
    url = f"http://127.0.0.1:{cluster.port}/v1"
    settings = direct_settings(url, "m1", ODD_ID, probe=True)
    with RouterServer(settings) as router, router.client() as client:
        first = client.post("/v1/chat/completions", json=chat())
        second = client.post("/v1/chat/completions", json=chat(stream=True, model=ODD_ID))
        assert router.metric("openweight_upstream_up", upstream="cluster") == 1
    assert (first.status_code, second.status_code) == (200, 200), (first.text, second.text)
    assert first.headers["x-openweight-upstream"] == second.headers["x-openweight-upstream"] == "cluster"
    assert second.text.rstrip().endswith("data: [DONE]")
    assert [(r.path, r.body["model"]) for r in cluster.requests] == [
        ("/m1/v1/chat/completions", "m1"), ("/org-model-2-beta-2e-2e/v1/chat/completions", ODD_ID),
    ]
    assert cluster.probes >= 2  # GET <route>/v1/models of each model



@pytest.mark.parametrize("asked", ["M1", "m1/", "../m1", "m1/../m1", "%6D1", "m1\u200b"])
def test_a_client_cannot_reach_a_route_with_a_name_that_only_slugs_like_a_model(fakes, asked: str) -> None:
    """Routes come from the config, never from what the client asks for: a name that is not a
    configured model is a 404 from the router, and nothing reaches the cluster."""
    cluster = fakes("cluster", prefixes=("/m1",))
    with RouterServer(direct_settings(f"http://127.0.0.1:{cluster.port}/v1", "m1")) as router, \
            router.client() as client:
        answer = client.post("/v1/chat/completions", json=chat(model=asked))
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "model_not_found"
    assert cluster.requests == []
