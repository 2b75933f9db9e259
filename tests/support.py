"""Helpers the test modules import: real routers on 127.0.0.1 at ephemeral ports, and their settings.

Fixtures live in conftest.py; what a test imports by name lives here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx

from router.app import create_app
from router.auth import KeyStore
from router.metrics import Metrics
from router.net import free_port
from router.server import server_config
from router.server_thread import ServerThread
from router.settings import Settings
from router.testing import FakeUpstream

MODEL = "m1"


class RouterServer:
    """The real router app under uvicorn in a background thread, on its own event loop (uvloop)."""

    def __init__(self, settings: Settings, keys: KeyStore | None = None, **server: Any) -> None:
        metrics = Metrics()
        self.app = create_app(settings, keys=keys if keys is not None else KeyStore([]), metrics=metrics)
        # The router's own server configuration, on an ephemeral port (`server`: other uvicorn options).
        config = server_config(self.app, settings.router, refused=metrics.refused, host="127.0.0.1", port=0,
                               log_level="warning", timeout_graceful_shutdown=5, **server)
        self.thread = ServerThread(config, "router")
        self.server = self.thread.server

    def __enter__(self) -> RouterServer:
        self.port = self.thread.start()
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def __exit__(self, *exc: object) -> None:
        self.thread.stop()

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=20, **kwargs)

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples of `name` on /metrics whose labels include `labels` (0 when none)."""
        text = httpx.get(self.url + "/metrics").text
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name):
                continue
            series, _, value = line.rpartition(" ")
            head, _, rest = series.partition("{")
            if head != name:
                continue
            found = dict(
                (k, v.strip('"')) for k, v in (pair.split("=", 1) for pair in rest.rstrip("}").split(",") if pair)
            )
            if all(found.get(k) == v for k, v in labels.items()):
                total += float(value)
        return total


def make_settings(cluster: FakeUpstream | str | None, providers: dict[str, FakeUpstream | str] | None = None,
                  **model: Any) -> Settings:
    """Settings for one model `m1` served by `cluster` with `providers` as fallbacks, in order."""
    providers = providers or {}
    url = lambda u: u.url if isinstance(u, FakeUpstream) else u  # noqa: E731
    fast_circuit = {"failure_threshold": 3, "reset_timeout_s": 0.5}
    router = model.pop("router", {})
    cluster_extra = model.pop("cluster_extra", {})
    return Settings(
        router={"retry": {"backoff_initial_s": 0.01, "backoff_max_s": 0.05}, "probe_interval_s": 3600, **router},
        cluster={"url": url(cluster) if cluster is not None else "http://127.0.0.1:9/v1",
                 "enabled": cluster is not None, "circuit": fast_circuit, "probe": False,
                 "first_byte_timeout_s": 2, "data_path": "classic", **cluster_extra},
        providers={name: {"url": url(p), "circuit": fast_circuit, "probe": False, "first_byte_timeout_s": 2}
                   for name, p in providers.items()},
        models={MODEL: {"fallbacks": [{"provider": n, "model": f"{n}-model"} for n in providers], **model}},
    )


def chat(stream: bool = False, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": stream, **extra}


def refused_url() -> str:
    """A loopback URL where nothing listens (connection refused)."""
    return f"http://127.0.0.1:{free_port()}/v1"


def until(condition: Callable[[], bool], timeout_s: float = 5.0, every_s: float = 0.02) -> bool:
    """Whether `condition()` held within `timeout_s` (asked every `every_s`)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(every_s)
    return False
