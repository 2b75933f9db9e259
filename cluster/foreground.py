"""The local stack in the foreground: start it, serve until SIGTERM, Ctrl-C or the router's exit, stop it.

``openweight run`` and ``openweight cluster up`` (without ``RAY_ADDRESS``) run
:func:`serve_until_stopped`. SIGTERM is turned into an exception like Ctrl-C's, so that both
unwind through every ``finally`` and stop what was started; a second signal during the stop ends
it quietly (Ray's folder, with its token, is removed even then: :meth:`cluster.runtime.LocalRay.shutdown`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Iterator
from types import FrameType

from cluster.progress import Progress
from cluster.stack import LocalStack
from router.config_file import config_path


class _Stop(Exception):
    """SIGTERM arrived."""


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`_Stop` (in the main thread) as Ctrl-C raises KeyboardInterrupt."""
    previous = signal.signal(signal.SIGTERM, _raise_stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def ready_message(stack: LocalStack) -> str:
    """The URL and a curl example, printed once everything answers."""
    settings = stack.settings
    model = next(iter(settings.models)) if stack.with_router else next(iter(stack.specs))
    base = f"{stack.router_url}/v1" if stack.with_router else settings.cluster_base_url(model)
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    auth_config = settings.router.auth
    keyed = stack.with_router and (auth_config.keys_file is not None or os.environ.get(auth_config.keys_env))
    auth = ' -H "authorization: Bearer $KEY"' if keyed else ""
    what = "openweight" if stack.with_router else "the cluster"
    return (
        f"\n{what} is ready: {base} (OpenAI-compatible)\n"
        f"  curl -s {base}/chat/completions -H 'content-type: application/json'{auth} \\\n"
        f"    -d '{body}'\n"
        "Ctrl-C stops everything."
    )


def serve_until_stopped(
    config: str | os.PathLike[str] | None,
    *,
    with_router: bool = True,
    direct_ingress: bool = False,
    deploy_timeout_s: float = 900.0,
    progress: Progress = print,
) -> int:
    """Start the local stack, serve until SIGTERM / Ctrl-C (or until the router exits), stop it.

    ``config`` defaults to ``$OPENWEIGHT_CONFIG``. Returns the exit status; errors of the cluster
    side (:mod:`cluster.errors`) propagate after everything started is stopped.
    """
    stack = LocalStack(
        config_path(config), progress=progress, with_router=with_router, direct_ingress=direct_ingress,
        deploy_timeout_s=deploy_timeout_s,
    )
    with _sigterm_raises():
        try:
            stack.start()
            t = stack.timings
            progress(
                f"started in {t.total_s:.0f} s (models {t.prepare_s:.0f} s, Ray {t.ray_s:.0f} s, "
                f"deploy {t.deploy_s:.0f} s, router {t.router_s:.0f} s)"
            )
            progress(ready_message(stack))
            code = stack.wait()
            progress(f"the router exited with status {code}; stopping")
            return code
        except (KeyboardInterrupt, _Stop):
            progress("stopping")
            return 0
        finally:
            with contextlib.suppress(KeyboardInterrupt, _Stop):
                stack.stop()
