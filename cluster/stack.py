"""The local stack behind ``make run``: models, a private Ray, the Serve app, then the router.

:class:`LocalStack` starts, in order:

1. the built-in models (download and convert once; later runs only check the cache);
2. a private local Ray (:func:`cluster.runtime.start_local_ray`) and Serve, whose proxy answers on
   the host and port of ``cluster.url``: HAProxy on the direct data path (the default), Serve's
   Python proxy on the classic one (with ``direct_ingress``, the OpenAI ingress replica itself does,
   see :func:`direct_ingress`, and the proxy listens on a private port);
3. the Serve config that KubeRay would get (Serve builds the ``ray.serve.llm`` application from it
   with ``cluster.builder:app_from_args``, so this process never imports vLLM), waiting until every
   replica is ready;
4. the router as a child process (:mod:`cluster.router_process`) on ``router.host:router.port``.

:meth:`LocalStack.stop` stops the router, then this Ray (``ray.shutdown``), nothing else. Serving
in the foreground until a signal is :mod:`cluster.foreground`; the command is ``openweight run``
(:mod:`cluster.cli`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

from cluster.builder import cluster_specs
from cluster.config import ServeSpec, load_cluster_config
from cluster.errors import ClusterConfigError, StackError
from cluster.model import resolve_source
from cluster.placement import placement
from cluster.progress import Progress
from cluster.router_process import RouterProcess
from router.auth import client_keys
from router.cluster_routes import DataPath
from router.net import free_port, port_free
from router.settings import Settings

METRICS_EXPORT_PORT = 8101
"""Ray's metrics port in the local stack (``ray_serve_*``, ``ray_vllm_*`` for Prometheus)."""


def _endpoint(url: str, what: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname is None:
        raise ClusterConfigError(f"{what}: the local stack needs an http:// URL, got {url}")
    return parts.hostname, parts.port or 80


def direct_ingress(specs: Mapping[str, ServeSpec]) -> bool:
    """Whether ``cluster.url`` can be served by the ingress replica itself rather than Serve's proxy.

    The local stack is one node with one ingress replica, so the proxy process in front of it is a
    hop with nothing to route: every token crosses one process less, and on a small machine that
    process no longer takes CPU from the engine (``openweight bench e2e``, docs/performance.md). Not
    when every model may scale to zero: Serve then scales the ingress to zero as well, and only the
    proxy, holding a request, would bring it back. Opt-in (:attr:`LocalStack.direct_ingress`): an
    ingress replica that dies cannot come back, since its successor finds the port still held by
    the dead one's closing connections and Serve then never hands that port out again. (On
    Kubernetes the chart keeps Serve's proxies: KubeRay's Service routes to them.)
    """
    return any(spec.replicas.min > 0 for spec in specs.values())


@dataclass(frozen=True)
class Timings:
    """Seconds each start-up step took."""

    prepare_s: float = 0.0
    ray_s: float = 0.0
    deploy_s: float = 0.0
    router_s: float = 0.0

    @property
    def total_s(self) -> float:
        return self.prepare_s + self.ray_s + self.deploy_s + self.router_s


@dataclass
class LocalStack:
    """Everything ``openweight run`` starts; :meth:`start` then :meth:`stop` (also a context manager).

    Reads the config at construction: :class:`ClusterConfigError` names what is wrong in it.
    """

    config_path: Path
    progress: Progress = print
    router_output: IO[Any] | None = None
    """Where the router's stdout/stderr go (default: this process's)."""
    metrics_export_port: int | None = METRICS_EXPORT_PORT
    deploy_timeout_s: float = 900.0
    with_router: bool = True
    """False: the cluster only (``openweight cluster up`` without ``RAY_ADDRESS``)."""
    direct_ingress: bool = False
    """Serve ``cluster.url`` from the ingress replica itself (see :func:`direct_ingress`)."""

    settings: Settings = field(init=False)
    public_specs: dict[str, ServeSpec] = field(init=False)
    """The ``serve`` blocks by public model name."""
    specs: dict[str, ServeSpec] = field(init=False)
    """The same by the model id the cluster serves."""
    serve_host: str = field(init=False)
    serve_port: int = field(init=False)
    """Host and port of ``cluster.url``."""
    timings: Timings = field(default_factory=Timings, init=False)
    """Filled in by :meth:`start`."""
    _local_ray: Any = field(default=None, init=False)
    _proxy_port: int | None = field(default=None, init=False)
    """Serve's proxy: the port of ``cluster.url``, or a private one with direct ingress."""
    _router: RouterProcess | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        try:
            settings, specs = load_cluster_config(self.config_path)
        except ClusterConfigError as exc:
            raise ClusterConfigError(f"{self.config_path}:\n{exc}") from None
        self.settings = settings
        self.public_specs = specs
        self.specs = cluster_specs(self.settings, specs)
        self.serve_host, self.serve_port = _endpoint(self.settings.cluster.url, "cluster.url")

    @property
    def _steps(self) -> int:
        return 4 if self.with_router else 3

    @property
    def proxy_url(self) -> str:
        """``cluster.url`` through Serve's proxy (the same as ``cluster.url`` without direct ingress)."""
        parts = urlsplit(self.settings.cluster.url)
        return parts._replace(netloc=f"{self.serve_host}:{self._proxy_port or self.serve_port}").geturl()

    @property
    def router_url(self) -> str:
        return f"http://{self.settings.router.host}:{self.settings.router.port}"

    def __enter__(self) -> LocalStack:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start every part, in order; on failure stop what was started and raise."""
        try:
            self._check_ports()
            t0 = time.monotonic()
            self._prepare()
            t1 = time.monotonic()
            self._start_ray()
            t2 = time.monotonic()
            self.deploy()
            t3 = time.monotonic()
            if self.with_router:
                self._start_router()
            t4 = time.monotonic()
        except BaseException:
            self.stop()
            raise
        self.timings = Timings(prepare_s=t1 - t0, ray_s=t2 - t1, deploy_s=t3 - t2, router_s=t4 - t3)

    def _check_ports(self) -> None:
        wanted = [("cluster.url", self.serve_host, self.serve_port)]
        if self.with_router:
            client_keys(self.settings)  # what would stop the router, before minutes of deploying
            wanted.append(("router.port", self.settings.router.host, self.settings.router.port))
        if self.metrics_export_port is not None:
            wanted.append(("Ray metrics", "0.0.0.0", self.metrics_export_port))
        for what, host, port in wanted:
            if not port_free(host, port):
                raise StackError(f"{what}: {host}:{port} is in use (is another stack running?)")

    def _prepare(self) -> None:
        self.progress(f"[1/{self._steps}] models")
        for model_id, spec in self.specs.items():
            source = resolve_source(spec.source, progress=lambda m: self.progress(f"  {m}"))
            self.progress(f"  {model_id}: {source}")

    def _start_ray(self) -> None:
        from cluster.runtime import start_local_ray, start_serve

        self.progress(f"[2/{self._steps}] local Ray")
        needed = sum(
            placement(spec).total("CPU") * (spec.replicas.initial or spec.replicas.min or 1)
            for spec in self.specs.values()
        )
        num_cpus = max(os.cpu_count() or 1, int(needed) + 2)  # + the OpenAI ingress and a spare
        haproxy = self.settings.cluster.data_path is DataPath.DIRECT  # HAProxy answers cluster.url
        direct = self.direct_ingress and direct_ingress(self.specs) and not haproxy
        self._proxy_port = free_port(self.serve_host) if direct else self.serve_port
        self._local_ray = start_local_ray(
            num_cpus=num_cpus,
            metrics_export_port=self.metrics_export_port,
            direct_ingress_port=self.serve_port if direct else None,
            haproxy=haproxy,
        )
        start_serve(host=self.serve_host, port=self._proxy_port)
        ray_env = f"RAY_ADDRESS={self._local_ray.gcs_address} RAY_AUTH_TOKEN_PATH={self._local_ray.token_path}"
        self.progress(f"  Ray up; logs in {self._local_ray.log_dir}")
        self.progress(f"  to reach it (e.g. `openweight cluster status`): {ray_env}")

    def serve_config(self) -> dict[str, Any]:
        """The Serve config this stack deploys: the one KubeRay gets, with this stack's HTTP address."""
        from cluster.builder import serve_config

        # With direct ingress, cluster.url is the OpenAI ingress replica itself, which cannot serve the
        # capacity route, and Serve hands direct-ingress replicas ports from a one-port range: the
        # capacity application is left out, and the router routes without replica counts.
        direct = self._proxy_port is not None and self._proxy_port != self.serve_port
        return serve_config(self.settings, self.public_specs, http_host=self.serve_host, http_port=self._proxy_port,
                            with_capacity=not direct)

    def deploy(self) -> None:
        """Deploy (or deploy again) the Serve application and wait until it runs.

        Serve builds it from the Serve config (``cluster.builder:app_from_args``), the path KubeRay
        takes; the models are already prepared, so the build only checks them.
        """
        from cluster.runtime import deploy_config

        self.progress(f"[3/{self._steps}] deploying " + ", ".join(self.specs) + " (vLLM engine start takes a while)")
        for name in ("ray.serve", "ray.llm"):  # their INFO lines drown the progress
            logging.getLogger(name).setLevel(logging.WARNING)
        deploy_config(self.serve_config(), timeout_s=self.deploy_timeout_s, progress=self.progress)
        self.progress(f"  cluster ready at {self.settings.cluster.url}")

    def undeploy(self, timeout_s: float = 180.0) -> None:
        """Delete the Serve application (the router then falls back to providers).

        With direct ingress, also wait until the ingress replica has let go of its port: a
        replica of the next :meth:`deploy` that found it still bound would have Serve mark the
        port unusable for good.
        """
        from cluster.runtime import delete

        for app in self.serve_config()["applications"]:
            delete(app["name"])
        deadline = time.monotonic() + timeout_s
        while self._proxy_port != self.serve_port and not port_free(self.serve_host, self.serve_port):
            if time.monotonic() > deadline:
                raise StackError(f"cluster.url: {self.serve_host}:{self.serve_port} still in use {timeout_s:.0f} s "
                                 "after the application was deleted")
            time.sleep(0.2)

    def _start_router(self) -> None:
        self.progress("[4/4] router")
        self._router = RouterProcess(config_path=self.config_path, url=self.router_url, output=self.router_output,
                                     grace_s=self.settings.router.shutdown_grace_s)
        self._router.start()

    def wait(self) -> int:
        """Block while the router runs and return its exit status (without a router: until a signal)."""
        if self._router is None:
            while True:
                time.sleep(3600)
        return self._router.wait()

    def stop(self) -> None:
        """Stop the router, then Serve and this Ray. Safe to call more than once."""
        router, self._router = self._router, None
        if router is not None:
            router.stop()
        local_ray, self._local_ray = self._local_ray, None
        if local_ray is not None:
            local_ray.shutdown()
