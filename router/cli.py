"""The `openweight` command line."""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from importlib import import_module
from typing import TYPE_CHECKING

import yaml

from router.settings import ConfigError, Settings, load_settings

if TYPE_CHECKING:
    from router.auth import KeyStore

log = logging.getLogger("openweight.router")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def client_keys(settings: Settings) -> KeyStore:
    """The client keys the router would serve with; :class:`ConfigError` where it would refuse to start."""
    from router.auth import KeyStore

    keys = KeyStore.from_config(settings.router.auth)
    host = settings.router.host
    if keys.open and not is_loopback(host) and not settings.router.auth.insecure_no_auth:
        raise ConfigError(
            f"no client API keys are configured, so the router only serves on a loopback address, "
            f"not {host!r}: set {settings.router.auth.keys_env} or router.auth.keys_file, "
            "or pass --insecure-no-auth"
        )
    return keys


def serve_router(settings: Settings) -> None:
    """Run the router until SIGTERM/SIGINT, then drain in-flight requests within the grace period."""
    # Deferred: `check-config` must not need the server stack.
    import uvicorn

    from router.app import create_app
    from router.server import server_config

    keys = client_keys(settings)
    host = settings.router.host
    if keys.open:
        log.warning("serving without client authentication on %s", host)
    app = create_app(settings, keys=keys)
    config = server_config(app, settings.router)
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


def _check_config(args: argparse.Namespace) -> int:
    from router.auth import KeyStore

    settings = load_settings(args.config_option or args.config)
    KeyStore.from_config(settings.router.auth)  # a keys file the router could not read fails here too
    data = settings.redacted()
    try:
        check_cluster = import_module("cluster.config").check_serve_blocks
    except (ImportError, AttributeError):
        check_cluster = None
    if check_cluster is not None:
        check_cluster(settings)
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(yaml.safe_dump(data, sort_keys=False), end="")
    return 0


def _optional(module: str, function: str) -> Callable[[argparse._SubParsersAction], None] | None:  # type: ignore[type-arg]
    """A subcommand group from a part that may not be installed (the router image has no Ray)."""
    try:
        return getattr(import_module(module), function)  # type: ignore[no-any-return]
    except (ImportError, AttributeError):
        return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="openweight", description=__doc__)
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
    check.set_defaults(func=_check_config)

    for module, function in (
        ("router.spend_cli", "register"),
        ("router.bench", "register"),
        ("cluster.cli", "register"),
        ("cluster.stack", "register_run"),
    ):
        register = _optional(module, function)
        if register is not None:
            register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per upstream call is noise
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
        return result
    except ConfigError as exc:
        print(f"openweight: invalid configuration:\n{exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
