"""Real processes for the live checks: the router (`openweight router`) and a Prometheus server."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from router.net import free_port


def wait_until(check: Any, timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
        except httpx.HTTPError:
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Process:
    """A child process in its own session; stopped with SIGTERM (then SIGKILL) on exit."""

    def __init__(self, cmd: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.cmd = cmd
        self.log = log
        self.env = env

    def __enter__(self) -> Process:
        self._log = self.log.open("wb")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        return self

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


class Router(Process):
    """`openweight router --config FILE --host 127.0.0.1 --port N` with the given config."""

    def __init__(self, config: dict[str, Any], workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        path = workdir / "router.yaml"
        path.write_text(yaml.safe_dump(config))
        exe = shutil.which("openweight", path=str(Path(sys.executable).parent)) or "openweight"
        env = {k: v for k, v in os.environ.items() if not k.startswith("OPENWEIGHT_")}
        super().__init__([exe, "router", "--config", str(path), "--host", "127.0.0.1", "--port", str(self.port)],
                         workdir / "router.log", env)

    def __enter__(self) -> Router:
        super().__enter__()
        try:
            wait_until(lambda: self._ready(), 30, "the router to answer /healthz")
        except AssertionError:
            self.__exit__(None, None, None)
            pytest.fail(f"the router did not start:\n{self.output()}")
        return self

    def _ready(self) -> bool:
        if not self.alive():
            raise AssertionError(f"the router exited:\n{self.output()}")
        return httpx.get(self.url + "/healthz", timeout=2).status_code == 200

    def chat(self, model: str, stream: bool = False) -> httpx.Response:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
        return httpx.post(self.url + "/v1/chat/completions", json=body, timeout=30)

    def sample_names(self) -> set[str]:
        """Every series name this router can export, from the families on /metrics (a labelled
        family shows its HELP/TYPE lines even before it has a sample)."""
        text = httpx.get(self.url + "/metrics", timeout=5).text
        names: set[str] = set()
        suffixes = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_sum", "_count", "_created"],
                    "gauge": [""], "summary": ["", "_sum", "_count", "_created"]}
        for family in text_string_to_metric_families(text):
            names |= {family.name + s for s in suffixes.get(family.type, [""])}
            names |= {sample.name for sample in family.samples}
        return names


class Prometheus(Process):
    """A real Prometheus server (Debian's `prometheus`) on 127.0.0.1 with a temporary TSDB."""

    def __init__(self, binary: str, config: dict[str, Any], workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config_path = workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        super().__init__([binary, f"--config.file={config_path}", f"--storage.tsdb.path={workdir / 'tsdb'}",
                          f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                         workdir / "prometheus.log")

    def __enter__(self) -> Prometheus:
        super().__enter__()
        try:
            wait_until(lambda: self.alive() and httpx.get(self.url + "/-/ready", timeout=2).status_code == 200,
                       60, "Prometheus to be ready")
        except AssertionError:
            self.__exit__(None, None, None)
            pytest.fail(f"Prometheus did not start:\n{self.output()}")
        return self

    def api(self, path: str, **params: str) -> Any:
        response = httpx.get(self.url + "/api/v1/" + path, params=params, timeout=5)
        response.raise_for_status()
        return response.json()["data"]
