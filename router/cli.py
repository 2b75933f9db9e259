"""The router's verbs of the ``openweight`` command line: ``router`` and ``check-config``.

:func:`build_parser` takes the verbs of the other parts (the cluster side, the benchmarks) as
arguments: the router imports neither, and :mod:`openweight.cli` puts them together.
``python -m router.cli`` runs the router's verbs alone (the local stack starts the router this way).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

import yaml

from router.auth import KeyStore, client_keys
from router.config_file import load_settings
from router.settings import ConfigError, Settings

log = logging.getLogger("openweight.router")

Register = Callable[[Any], None]
"""Adds a part's verbs to the ``argparse`` subparsers object it is given."""

ConfigCheck = Callable[[Settings], None]
"""A further check of loaded settings for ``check-config``; raises :class:`ConfigError`."""


def serve_router(settings: Settings) -> None:
    """Run the router until SIGTERM/SIGINT, then drain in-flight requests within the grace period."""
    # Deferred: `check-config` must not need the server stack.
    import uvicorn

    from router.app import create_app
    from router.metrics import Metrics
    from router.server import server_config

    keys = client_keys(settings)
    host = settings.router.host
    if keys.open:
        log.warning("serving without client authentication on %s", host)
    metrics = Metrics()
    app = create_app(settings, keys=keys, metrics=metrics)
    config = server_config(app, settings.router, refused=metrics.refused)
    uvicorn.Server(config).run()


def exit_with_parent(parent: int) -> None:
    """Have the kernel send this process SIGTERM when its parent `parent` dies (Linux; elsewhere nothing).

    ``openweight run`` starts the router this way: killed outright (SIGKILL, the OOM killer), it
    cannot stop its child, which would otherwise keep serving and keep the port.
    """
    if sys.platform != "linux":
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the call: no signal will come
        raise SystemExit(f"openweight router: the parent process {parent} is gone")


def _router(args: argparse.Namespace) -> int:
    if args.exit_with_parent is not None:
        exit_with_parent(args.exit_with_parent)
    settings = load_settings(args.config)
    router = settings.router
    changes = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    if args.insecure_no_auth:
        changes["auth"] = router.auth.model_copy(update={"insecure_no_auth": True})
    if changes:
        settings = settings.model_copy(update={"router": router.model_copy(update=changes)})
    serve_router(settings)
    return 0


def _check_config(args: argparse.Namespace, checks: Sequence[ConfigCheck] = ()) -> int:
    settings = load_settings(args.config_option or args.config)
    KeyStore.from_config(settings.router.auth)  # a keys file the router could not read fails here too
    data = settings.redacted()
    for check in checks:
        check(settings)
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(yaml.safe_dump(data, sort_keys=False), end="")
    return 0


def build_parser(
    commands: Sequence[Register] = (), config_checks: Sequence[ConfigCheck] = ()
) -> argparse.ArgumentParser:
    """``router`` and ``check-config``, then the verbs each of ``commands`` adds.

    ``config_checks`` run in ``check-config`` after the router's own (the cluster's ``serve`` blocks).
    """
    parser = argparse.ArgumentParser(prog="openweight", description="The `openweight` command line.")
    sub = parser.add_subparsers(dest="command", required=True)

    router = sub.add_parser("router", help="run the OpenAI-compatible router")
    router.add_argument("--config", help="config file (default: $OPENWEIGHT_CONFIG)")
    router.add_argument("--host", help="address to listen on (overrides router.host)")
    router.add_argument("--port", type=int, help="port to listen on (overrides router.port)")
    router.add_argument(
        "--insecure-no-auth", action="store_true", help="serve without client keys on a non-loopback address"
    )
    router.add_argument(
        "--exit-with-parent", type=int, metavar="PID",
        help="stop (as on SIGTERM) when process PID, the one that started the router, dies (Linux)",
    )
    router.set_defaults(func=_router)

    check = sub.add_parser("check-config", help="validate a config file and print it with secrets redacted")
    check.add_argument("config", nargs="?", help="config file (default: $OPENWEIGHT_CONFIG)")
    check.add_argument("--config", dest="config_option", metavar="FILE", help="the same, as the router takes it")
    check.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    check.set_defaults(func=functools.partial(_check_config, checks=tuple(config_checks)))

    for register in commands:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None, *, parser: argparse.ArgumentParser | None = None) -> int:
    """Parse ``argv`` with ``parser`` (default: the router's verbs alone) and run the verb; the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per upstream call is noise
    args = (parser or build_parser()).parse_args(argv)
    try:
        result: int = args.func(args)
        return result
    except ConfigError as exc:
        print(f"openweight: invalid configuration:\n{exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
