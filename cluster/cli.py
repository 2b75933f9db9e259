"""Command-line verbs of the cluster side, added to the ``openweight`` CLI by :func:`register`.

::

    openweight cluster serve-config --config FILE   # Serve config (YAML) for KubeRay's serveConfigV2
    openweight cluster up --config FILE             # deploy to $RAY_ADDRESS, or run a private local Ray
    openweight cluster status [--config FILE]       # Serve status on $RAY_ADDRESS / probe cluster.url
    openweight model prepare NAME                   # fetch + convert a built-in model once

Every verb sets ``func`` on the parsed namespace: ``args.func(args) -> int`` (exit status).
Importing this module imports neither Ray nor vLLM; each verb imports what it needs.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request
from typing import Any

import yaml

from router.settings import ConfigError


def _fail(verb: str, exc: BaseException | str, code: int) -> int:
    print(f"openweight {verb}: {exc}", file=sys.stderr)
    return code


def _serve_config(args: argparse.Namespace) -> int:
    from cluster.builder import serve_config
    from cluster.config import load_cluster_config

    try:
        settings, specs = load_cluster_config(args.config)
        config = serve_config(settings, specs, http_host=args.http_host, http_port=args.http_port)
    except ConfigError as exc:
        return _fail("cluster serve-config", exc, 2)
    sys.stdout.write(yaml.safe_dump(config, sort_keys=False))
    return 0


def _up_remote(args: argparse.Namespace, address: str) -> int:
    from cluster.builder import serve_config
    from cluster.config import load_cluster_config
    from cluster.runtime import connect, deploy_config, start_serve

    settings, specs = load_cluster_config(args.config)
    config = serve_config(settings, specs)
    connect(address)
    http = config["http_options"]
    start_serve(host=http["host"], port=http["port"])
    models = [model for app in config["applications"] for model in app["args"]["models"]]
    print(f"deploying {', '.join(models)} to {address} ({settings.cluster.data_path.value} data path)")
    deploy_config(config, timeout_s=args.timeout)
    print(f"deployed; Serve HTTP on port {http['port']} of every node")
    return 0


def _up(args: argparse.Namespace) -> int:
    from cluster.runtime import ClusterError
    from cluster.stack import StackError, serve_until_stopped

    try:
        if address := os.environ.get("RAY_ADDRESS"):
            return _up_remote(args, address)
        return serve_until_stopped(args.config, with_router=False, deploy_timeout_s=args.timeout)
    except ConfigError as exc:
        return _fail("cluster up", exc, 2)
    except (ClusterError, StackError) as exc:
        return _fail("cluster up", exc, 1)


def _probe(url: str) -> str:
    try:
        with urllib.request.urlopen(f"{url}/models", timeout=5) as response:
            return f"{url}: HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return f"{url}: HTTP {exc.code}"
    except OSError as exc:
        return f"{url}: unreachable ({exc})"


def _status(args: argparse.Namespace) -> int:
    address = os.environ.get("RAY_ADDRESS")
    if args.config:
        from router.settings import load_settings

        try:
            settings = load_settings(args.config)
            bases = (settings.cluster_base_url(settings.cluster_model_id(name)) for name in settings.models)
            for base in dict.fromkeys(bases):  # on the direct path, one line per model (its route)
                print(_probe(base))
        except ConfigError as exc:
            return _fail("cluster status", exc, 2)
    if not address:
        if not args.config:
            return _fail("cluster status", "set RAY_ADDRESS (or pass --config to probe cluster.url)", 2)
        return 0
    from cluster.runtime import ClusterError, connect, status_text

    try:
        connect(address)
        print(status_text())
    except ClusterError as exc:
        return _fail("cluster status", exc, 1)
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from cluster.model import ModelError, prepare

    try:
        print(prepare(args.name, progress=print))
    except ModelError as exc:
        return _fail("model prepare", exc, 1)
    return 0


def register(subparsers: Any) -> None:
    """Add the ``cluster`` and ``model`` verbs to an ``argparse`` subparsers object."""
    from cluster.model import BUILTIN_MODELS

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
