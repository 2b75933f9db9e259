"""LiteLLM's proxy as the peer in side-by-side benchmarks, in a virtual environment of its own.

LiteLLM is not a dependency of openweight: the first benchmark that needs it creates
``.cache/bench/litellm-venv`` and installs ``litellm[proxy]`` there (newer releases' ``proxy`` extra
needs packages some registries lack; this release installs from PyPI alone). It is configured like
the router it is compared with: the same model on the same primary upstream, a second upstream as
its fallback, no retries of the primary, no database, no callbacks, access log off (the router logs
no line per request either).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import yaml

from bench.harness import service

VERSION = "1.100.5"
DEFAULT_VENV = Path(".cache/bench/litellm-venv")
FALLBACK_SUFFIX = "-fallback"


def ensure_installed(venv: Path = DEFAULT_VENV) -> Path:
    """The ``litellm`` executable of ``venv``, creating the venv and installing LiteLLM when needed."""
    executable = venv / "bin" / "litellm"
    if executable.exists() and _installed_version(venv) == VERSION:
        return executable
    print(f"installing litellm[proxy]=={VERSION} into {venv} (once; a few minutes)", file=sys.stderr, flush=True)
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", f"litellm[proxy]=={VERSION}"],
                   check=True)
    return executable


def _installed_version(venv: Path) -> str | None:
    found = list((venv / "lib").glob("python3*/site-packages/litellm-*.dist-info"))
    return found[0].name.removeprefix("litellm-").removesuffix(".dist-info") if found else None


def config(model: str, primary_url: str, fallback_url: str | None, *, timeout_s: float | None = None,
           extra_settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """A LiteLLM proxy config: ``model`` on ``primary_url``, falling back to the same model on ``fallback_url``."""

    def deployment(name: str, url: str) -> dict[str, Any]:
        params: dict[str, Any] = {"model": f"openai/{model}", "api_base": url, "api_key": "none"}
        if timeout_s is not None:
            params["timeout"] = timeout_s
            params["stream_timeout"] = timeout_s
        return {"model_name": name, "litellm_params": params}

    models = [deployment(model, primary_url)]
    settings: dict[str, Any] = {"num_retries": 0, "drop_params": True}
    if fallback_url is not None:
        models.append(deployment(model + FALLBACK_SUFFIX, fallback_url))
        settings["fallbacks"] = [{model: [model + FALLBACK_SUFFIX]}]
    settings.update(extra_settings or {})
    return {"model_list": models, "router_settings": {"num_retries": 0}, "litellm_settings": settings}


_LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(levelname)s %(name)s: %(message)s"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {
        "uvicorn": {"handlers": ["stderr"], "level": "WARNING"},
        "uvicorn.access": {"handlers": ["stderr"], "level": "WARNING", "propagate": False},
    },
}


@contextlib.contextmanager
def proxy(settings: dict[str, Any], port: int, directory: Path, log: IO[bytes], *,
          venv: Path = DEFAULT_VENV) -> Iterator[subprocess.Popen[bytes]]:
    """Run LiteLLM's proxy with ``settings`` on 127.0.0.1:``port`` until the block ends."""
    executable = ensure_installed(venv)
    path = directory / f"litellm-{port}.yaml"
    path.write_text(yaml.safe_dump(settings))
    logging_path = directory / "litellm-logging.json"
    logging_path.write_text(json.dumps(_LOGGING))
    argv = [str(executable.absolute()), "--config", str(path), "--host", "127.0.0.1", "--port", str(port),
            "--num_workers", "1", "--log_config", str(logging_path)]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "LITELLM_LOCAL_MODEL_COST_MAP": "True",
           "LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False", "DISABLE_SCHEMA_UPDATE": "True"}
    with service("litellm", argv, f"http://127.0.0.1:{port}/health/liveliness", log, env=env,
                 ready_timeout_s=180) as process:
        yield process
