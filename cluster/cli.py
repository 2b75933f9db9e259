"""Command-line verbs of the cluster side, added to the ``openweight`` CLI by :func:`register`.

::

    openweight run --config FILE                    # the local stack: models, Ray Serve + vLLM, router
    openweight cluster serve-config --config FILE   # Serve config (YAML) for KubeRay's serveConfigV2
    openweight cluster up --config FILE             # deploy to $RAY_ADDRESS, or run a private local Ray
    openweight cluster status [--config FILE]       # Serve status on $RAY_ADDRESS / probe cluster.url
    openweight model prepare NAME                   # fetch + convert a built-in model once

Every verb sets ``func`` on the parsed namespace: ``args.func(args) -> int`` (exit status). A verb
that fails ends with one line on stderr, ``openweight <verb>: <what went wrong>``, and the exit
status :func:`cluster.errors.failure` gives (2: the config; 1: the rest). Importing this module
imports neither Ray nor vLLM; each verb imports what it needs.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import yaml

from cluster.errors import ClusterConfigError, failure

if TYPE_CHECKING:
    from router.settings import Settings

Verb = Callable[[argparse.Namespace], int]


def _verb(name: str) -> Callable[[Verb], Verb]:
    """Have the verb ``openweight <name>`` end a failure with one line and its exit status, not a traceback."""

    def wrap(verb: Verb) -> Verb:
        @functools.wraps(verb)
        def run(args: argparse.Namespace) -> int:
            try:
                return verb(args)
            except Exception as exc:
                found = failure(exc)
                if found is None:
                    raise
                message, code = found
                print(f"openweight {name}: {message}", file=sys.stderr)
                return code

        return run

    return wrap


@_verb("run")
def _run(args: argparse.Namespace) -> int:
    from cluster.foreground import serve_until_stopped

    return serve_until_stopped(args.config, direct_ingress=args.direct_ingress)


@_verb("cluster serve-config")
def _serve_config(args: argparse.Namespace) -> int:
    from cluster.builder import serve_config
    from cluster.config import load_cluster_config

    settings, specs = load_cluster_config(args.config)
    config = serve_config(settings, specs, http_host=args.http_host, http_port=args.http_port)
    sys.stdout.write(yaml.safe_dump(config, sort_keys=False))
    return 0


def _up_remote(args: argparse.Namespace, address: str) -> int:
    from cluster.builder import IMPORT_PATH, serve_config
    from cluster.config import load_cluster_config
    from cluster.runtime import connect, deploy_config, start_serve

    settings, specs = load_cluster_config(args.config)
    config = serve_config(settings, specs)
    connect(address)
    http = config["http_options"]
    start_serve(host=http["host"], port=http["port"])
    models = [model for app in config["applications"] if app["import_path"] == IMPORT_PATH
              for model in app["args"]["models"]]
    print(f"deploying {', '.join(models)} to {address} ({settings.cluster.data_path.value} data path)")
    deploy_config(config, timeout_s=args.timeout)
    from router.redaction import redact_url

    print(f"deployed; Serve HTTP on port {http['port']} of every node")
    for model in models:  # the OpenAI base URL of each (on the direct path, the model's own route)
        print(f"  {model}: {redact_url(settings.cluster_base_url(model))}")
    return 0


@_verb("cluster up")
def _up(args: argparse.Namespace) -> int:
    from cluster.foreground import serve_until_stopped

    if address := os.environ.get("RAY_ADDRESS"):
        return _up_remote(args, address)
    return serve_until_stopped(args.config, with_router=False, deploy_timeout_s=args.timeout)


def _probe(url: str) -> str:
    try:
        with urllib.request.urlopen(f"{url}/models", timeout=5) as response:
            return f"{url}: HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return f"{url}: HTTP {exc.code}"
    except OSError as exc:
        return f"{url}: unreachable ({exc})"


def _capacity(settings: Settings) -> list[str]:
    """Replicas per model from the capacity route (as the router reads it), one line each."""
    from router.capacity import STATES, capacity_url

    url = capacity_url(settings.cluster)
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            models = json.load(response).get("models") or {}
    except urllib.error.HTTPError as exc:
        return [f"{url}: HTTP {exc.code} (no capacity route: the router routes without replica counts)"]
    except (OSError, ValueError) as exc:
        return [f"{url}: unreachable ({exc})"]
    return [f"{model}: " + ", ".join(f"{state} {counts.get(state)}" for state in STATES)
            for model, counts in models.items()] or [f"{url}: no model deployed"]


@_verb("cluster status")
def _status(args: argparse.Namespace) -> int:
    address = os.environ.get("RAY_ADDRESS")
    if args.config:
        from router.config_file import load_settings

        settings = load_settings(args.config)
        bases = (settings.cluster_base_url(settings.cluster_model_id(name)) for name in settings.models)
        for base in dict.fromkeys(bases):  # on the direct path, one line per model (its route)
            print(_probe(base))
        if settings.cluster.capacity.enabled:
            print("replicas (capacity route):")
            for line in _capacity(settings):
                print(f"  {line}")
    if not address:
        if not args.config:
            raise ClusterConfigError("set RAY_ADDRESS (or pass --config to probe cluster.url)")
        return 0
    from cluster.runtime import connect, status_text

    connect(address)
    print(status_text())
    return 0


@_verb("model prepare")
def _prepare(args: argparse.Namespace) -> int:
    from cluster.model import prepare

    print(prepare(args.name, progress=print))
    return 0


def register(subparsers: Any) -> None:
    """Add the ``run``, ``cluster`` and ``model`` verbs to an ``argparse`` subparsers object."""
    from cluster.model import BUILTIN_MODELS

    run = subparsers.add_parser("run", help="start the local stack: models, Ray Serve + vLLM, router")
    run.add_argument("--config", help="config file (default: $OPENWEIGHT_CONFIG)")
    run.add_argument(
        "--direct-ingress", action="store_true",
        help="classic data path only: serve cluster.url from the OpenAI ingress replica itself, not Serve's "
        "proxy: one process hop less per token, but a crashed ingress replica cannot come back (its port stays "
        "blocked)",
    )
    run.set_defaults(func=_run)

    cluster = subparsers.add_parser("cluster", help="the self-hosted Ray Serve + vLLM cluster")
    verbs = cluster.add_subparsers(dest="cluster_command", required=True)

    config = verbs.add_parser("serve-config", help="print the Ray Serve config (KubeRay serveConfigV2) as YAML")
    config.add_argument("--config", help="config file (default: $OPENWEIGHT_CONFIG)")
    config.add_argument("--http-host", default="0.0.0.0", help="address Serve's HTTP proxies listen on")
    config.add_argument("--http-port", type=int, default=None, help="Serve HTTP port (default: cluster.url's)")
    config.set_defaults(func=_serve_config)

    up = verbs.add_parser(
        "up",
        help="deploy the models to the Ray at $RAY_ADDRESS (replacing its Serve apps, like `serve deploy`), "
        "or run them on a private local Ray until Ctrl-C",
    )
    up.add_argument("--config", help="config file (default: $OPENWEIGHT_CONFIG)")
    up.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the replicas")
    up.set_defaults(func=_up)

    status = verbs.add_parser("status", help="Serve status on $RAY_ADDRESS; with --config, probe cluster.url")
    status.add_argument("--config", help="config file whose cluster.url to probe")
    status.set_defaults(func=_status)

    model = subparsers.add_parser("model", help="built-in models (no Hugging Face hub needed)")
    model_verbs = model.add_subparsers(dest="model_command", required=True)
    prepare = model_verbs.add_parser("prepare", help="download, check and convert a built-in model once")
    prepare.add_argument("name", choices=sorted(BUILTIN_MODELS), help="built-in model")
    prepare.set_defaults(func=_prepare)
