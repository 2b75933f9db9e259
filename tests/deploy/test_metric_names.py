"""Dashboards and alerts reference only metric names that exist.

`metric_names.txt` lists every series name the rules and dashboards select. The openweight_*
names are checked here against a running router; the ray_* names against a real scrape of the
local cluster's metrics agent, in tests/cluster/test_e2e.py (it needs Ray and vLLM running).
"""

from __future__ import annotations

from pathlib import Path

from router.testing import Behavior, FakeUpstream
from tests.deploy import support
from tests.deploy.live import Router

PROMETHEUS_OWN = {"up"}


def test_the_list_matches_what_the_files_reference() -> None:
    listed = support.expected_names()
    assert listed == sorted(set(listed)), "keep metric_names.txt sorted and unique"
    referenced = support.referenced_names()
    assert set(listed) == referenced, (
        f"missing from metric_names.txt: {sorted(referenced - set(listed))}; "
        f"listed but not referenced: {sorted(set(listed) - referenced)}"
    )


def test_only_known_prefixes() -> None:
    for name in support.expected_names():
        assert name.startswith(("openweight_", "ray_serve_", "ray_vllm_")) or name in PROMETHEUS_OWN, name


def test_the_extraction_sees_names_in_selectors_and_not_in_strings() -> None:
    expr = 'sum by (model) (rate(openweight_requests_total{upstream="ray_fake_label"}[5m])) / up'
    assert support.metric_names(expr) == {"openweight_requests_total", "up"}
    assert support.metric_names("openweight_tokens:self_hosted_share_rate5m > 0") == set()


def router_config(cluster: FakeUpstream, provider: FakeUpstream) -> dict[str, object]:
    fast = {"probe": False, "first_byte_timeout_s": 5}
    return {
        "router": {"probe_interval_s": 3600, "retry": {"max_attempts": 1}},
        "cluster": {"url": cluster.url, "data_path": "classic", **fast},  # the fake serves at the url itself
        "providers": {"p": {"url": provider.url, **fast, "budget": {"usd": 100, "period": "month"}}},
        "models": {"m": {"serve": {"source": "org/m", "cost_per_replica_hour": 2.5},
                         "fallbacks": [{"provider": "p", "model": "p-model",
                                        "price": {"input_per_mtok": 0.5, "output_per_mtok": 1.5}}]}},
    }


def test_every_openweight_name_is_exported_by_a_running_router(tmp_path: Path) -> None:
    with FakeUpstream("cluster", default=Behavior(status=503)) as cluster, FakeUpstream("p") as provider:
        cluster.capacity = {"m": {"running": 1, "starting": 0, "target": 1, "max_ongoing_requests": 8}}
        with Router(router_config(cluster, provider), tmp_path) as router:
            assert router.chat("m").status_code == 200
            assert router.chat("m", stream=True).status_code == 200
            exported = router.sample_names()
    wanted = {n for n in support.expected_names() if n.startswith("openweight_")}
    assert wanted, "no openweight_* name referenced"
    missing = wanted - exported
    assert not missing, f"referenced but not exported by the router: {sorted(missing)}"
