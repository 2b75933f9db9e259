"""The real local stack for the ``e2e`` and ``soak`` suites, and vLLM's own server to compare with.

The stack is the cluster side's :class:`cluster.stack.LocalStack` (models, a private Ray, the Serve
app) without its router: the suites start the router themselves (:func:`bench.servers.openweight`)
to know its process. vLLM's own OpenAI server runs the same model folder with the same engine
arguments and environment as the Serve replica.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import yaml

from bench.harness import answers, descendants, service, stop_group
from router.net import free_port

MODEL = "smollm2-135m-instruct"
"""The built-in model (``builtin:smollm2-135m-instruct``): CPU is enough."""


def stack_config(*, fallback_url: str | None = None, cluster: dict[str, Any] | None = None,
                 serve: dict[str, Any] | None = None, router: dict[str, Any] | None = None) -> dict[str, Any]:
    """A config for the local stack on free ports: the built-in model, optionally a fallback provider."""
    model: dict[str, Any] = {
        "serve": {"source": f"builtin:{MODEL}", "accelerator": "cpu", "max_ongoing_requests": 64, **(serve or {})},
    }
    config: dict[str, Any] = {
        "router": {"host": "127.0.0.1", "port": free_port(), **(router or {})},
        "cluster": {"url": f"http://127.0.0.1:{free_port()}/v1", "first_byte_timeout_s": 120, **(cluster or {})},
        "models": {MODEL: model},
    }
    if fallback_url is not None:
        # It continues a stream the cluster broke off (as a vLLM- or SGLang-based provider would).
        config["providers"] = {"fallback": {"url": fallback_url, "continuation": "continue_final_message"}}
        model["fallbacks"] = [{"provider": "fallback", "model": MODEL}]
    return config


def write_config(config: dict[str, Any], directory: Path) -> Path:
    path = directory / "stack.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@contextlib.contextmanager
def local_stack(path: Path, log: IO[bytes], *, direct_ingress: bool = False) -> Iterator[Any]:
    """The cluster side of ``openweight run`` (no router) for the config at ``path``."""
    from cluster.stack import LocalStack

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    stack = LocalStack(path, progress=progress, with_router=False, router_output=log, metrics_export_port=None,
                       deploy_timeout_s=900, direct_ingress=direct_ingress)
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


@contextlib.contextmanager
def classic_stack(config: dict[str, Any], directory: Path, log: IO[bytes]) -> Iterator[int]:
    """The same stack on the classic data path, as ``openweight cluster up`` runs it (a private Ray
    in a process of its own: one Ray per driver process); yields that process's id. Start it before
    an in-process stack, whose Serve settings would otherwise reach it through the environment."""
    classic = {**config, "cluster": {**config["cluster"], "data_path": "classic",
                                     "url": f"http://127.0.0.1:{free_port()}/v1"}}
    classic.pop("router", None)
    path = directory / "classic.yaml"
    path.write_text(yaml.safe_dump(classic))
    argv = [sys.executable, "-m", "openweight", "cluster", "up", "--config", str(path)]
    ready = f"{classic['cluster']['url']}/models"
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 900
        while not answers(ready):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the classic stack did not answer at {ready} (status {process.poll()})")
            time.sleep(1)
        yield process.pid
    finally:
        stop_group(process, grace_s=120)  # it stops its own Ray on SIGTERM, which takes tens of seconds


def engine_setup(path: Path) -> tuple[str, str, dict[str, Any], dict[str, str]]:
    """(cluster model id, model folder, engine arguments, engine environment) of the config's one model."""
    from cluster.builder import cluster_specs
    from cluster.config import load_cluster_config
    from cluster.model import resolve_source

    settings, specs = load_cluster_config(path)
    model_id, spec = next(iter(cluster_specs(settings, specs).items()))
    return model_id, resolve_source(spec.source), spec.engine_kwargs, spec.engine_env


def vllm_argv(model_id: str, folder: str, engine_kwargs: dict[str, Any], port: int) -> list[str]:
    """vLLM's own OpenAI server with the engine arguments the Serve replica gets."""
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", folder,
            "--served-model-name", model_id, "--host", "127.0.0.1", "--port", str(port)]
    for key, value in engine_kwargs.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False or value is None:
            continue
        else:
            argv += [flag, json.dumps(value) if isinstance(value, dict | list) else str(value)]
    return argv


@contextlib.contextmanager
def vllm_server(path: Path, log: IO[bytes]) -> Iterator[tuple[str, int]]:
    """vLLM's OpenAI server for the config's model on a free port; yields its base URL (with /v1) and
    the process id of its API server (the engine runs in processes below it)."""
    model_id, folder, engine_kwargs, engine_env = engine_setup(path)
    port = free_port()
    env = {**os.environ, **engine_env}
    with service("vLLM server", vllm_argv(model_id, folder, engine_kwargs, port), f"http://127.0.0.1:{port}/v1/models",
                 log, env=env, ready_timeout_s=600) as process:
        yield f"http://127.0.0.1:{port}/v1", process.pid


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def engine_processes(root: int | None = None) -> list[int]:
    """vLLM engine processes below ``root`` (default: this process, which started the local Ray).

    vLLM's engine core runs in a process of its own (``VLLM::EngineCore``), which starts one model
    runner process per device (``VLLM::Worker``).
    """
    return [pid for pid in descendants(root or os.getpid()) if _cmdline(pid).startswith(("VLLM::EngineCore",
                                                                                          "VLLM::Worker"))]


def serve_processes(root: int | None = None) -> dict[str, list[int]]:
    """The Ray Serve processes below ``root`` (default: this process, which started the local Ray), by
    role: ``ingress`` (the OpenAI ingress replica), ``llm_server`` (the replica that runs vLLM's
    front end: tokenizing, detokenizing, the OpenAI answers; on the direct path, vLLM's whole app),
    ``proxy`` (Serve's HTTP proxy), and on the direct path ``haproxy`` and ``llm_router`` (the replica
    HAProxy asks which LLM replica takes each request)."""
    roles: dict[str, list[int]] = {"ingress": [], "llm_server": [], "proxy": [], "haproxy": [], "llm_router": []}
    for pid in descendants(root or os.getpid()):
        name = _cmdline(pid).split(" ", 1)[0]  # Ray names an actor's process after it
        if name.startswith("ray::ServeReplica:"):
            if "OpenAiIngress" in name:
                roles["ingress"].append(pid)
            elif "LLMServer" in name:
                roles["llm_server"].append(pid)
            elif "LLMRouter" in name:
                roles["llm_router"].append(pid)
        elif name.startswith("ray::ProxyActor"):
            roles["proxy"].append(pid)
        elif name.endswith("/haproxy"):
            roles["haproxy"].append(pid)
    return roles


def kill_engine(root: int | None = None) -> list[int]:
    """SIGKILL every vLLM engine process below ``root``; returns their ids."""
    pids = engine_processes(root)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


def wait_engine(root: int | None = None, timeout_s: float = 600.0) -> float | None:
    """Seconds until an engine process exists below ``root`` again (None: not within ``timeout_s``)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if engine_processes(root):
            return time.monotonic() - started
        time.sleep(0.5)
    return None
