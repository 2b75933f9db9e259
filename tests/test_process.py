"""The router as a process: metrics exposition, secrets hygiene, SIGTERM draining, the CLI."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from bench.harness import answers
from router.net import free_port
from router.testing import Behavior, FakeUpstream
from tests.support import MODEL, chat

SECRET = "sk-live-0123456789abcdef-never-leak"


def write_config(path: Path, cluster: str, provider: str, **router: object) -> Path:
    path.write_text(yaml.safe_dump({
        "router": {"probe_interval_s": 0.2, "shutdown_grace_s": 10, **router},
        "cluster": {"url": cluster, "data_path": "classic", "circuit": {"failure_threshold": 2, "reset_timeout_s": 60}},
        "providers": {"prov": {"url": provider, "api_key_env": "PROV_TEST_KEY"}},
        "models": {MODEL: {"fallbacks": [{"provider": "prov", "model": "prov-m1"}]}},
    }))
    return path


class RouterProcess:
    def __init__(self, config: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "router.cli", "router", "--config", str(config), "--port", str(self.port)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, **(env or {})},
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(self.url + "/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"router did not start: {self.proc.communicate()[0]}")
            time.sleep(0.05)

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.communicate(timeout=30)[0]


def check_config(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """``openweight check-config`` with ``args``, as a process of its own."""
    return subprocess.run([sys.executable, "-m", "router.cli", "check-config", *args],
                          capture_output=True, text=True, **kwargs)


@contextlib.contextmanager
def streaming(router: RouterProcess) -> Iterator[Iterator[str]]:
    """A streamed chat request through ``router`` whose first event has arrived: yields the lines after it."""
    with httpx.Client(base_url=router.url, timeout=20) as client, client.stream(
        "POST", "/v1/chat/completions", json=chat(stream=True)
    ) as r:
        lines = r.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        yield lines


def test_metrics_exposition_moves_and_passes_promtool(tmp_path):
    promtool = shutil.which("promtool")
    assert promtool, "promtool is installed by `make test` (Debian package prometheus)"
    with FakeUpstream("cluster") as cluster, FakeUpstream("prov") as prov:
        router = RouterProcess(write_config(tmp_path / "c.yaml", cluster.url, prov.url), {"PROV_TEST_KEY": SECRET})
        try:
            client = httpx.Client(base_url=router.url)
            client.post("/v1/chat/completions", json=chat())
            cluster.default = Behavior(status=500)
            client.post("/v1/chat/completions", json=chat(stream=True))
            client.post("/v1/chat/completions", content=b"{", headers={"content-type": "application/json"})
            text = client.get("/metrics").text
        finally:
            router.stop()
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    for sample in [
        'openweight_requests_total{key="anonymous",model="m1",status="200",upstream="cluster"} 1.0',
        'openweight_requests_total{key="anonymous",model="m1",status="200",upstream="prov"} 1.0',
        'openweight_requests_total{key="anonymous",model="none",status="400",upstream="none"} 1.0',
        'openweight_fallbacks_total{from_upstream="cluster",model="m1",reason="server_error",to_upstream="prov"} 1.0',
        'openweight_upstream_attempts_total{outcome="server_error",upstream="cluster"} 1.0',
        'openweight_time_to_first_token_seconds_count{model="m1",upstream="prov"} 1.0',
        'openweight_request_duration_seconds_count{model="m1",upstream="cluster"} 1.0',
        'openweight_tokens_total{key="anonymous",kind="completion",model="m1",upstream="prov"} 5.0',
        'openweight_in_flight_requests{model="m1"} 0.0',
        'openweight_upstream_up{upstream="prov"} 1.0',
        'openweight_circuit_state{upstream="cluster"} 0.0',
        "openweight_router_overhead_seconds_count 3.0",
    ]:
        assert sample in text, sample
    assert "openweight_stream_errors_total" in text


def test_provider_key_never_appears_in_logs_errors_metrics_or_headers(tmp_path):
    leaky = Behavior(status=401, body=f'{{"error": {{"message": "bad key {SECRET}"}}}}'.encode())
    with FakeUpstream("cluster", default=Behavior(status=500)) as cluster, FakeUpstream("prov", default=leaky) as prov:
        router = RouterProcess(write_config(tmp_path / "c.yaml", cluster.url, prov.url), {"PROV_TEST_KEY": SECRET})
        try:
            client = httpx.Client(base_url=router.url)
            seen = []
            for body in (chat(), chat(stream=True)):
                r = client.post("/v1/chat/completions", json=body)
                seen.append(r.text + str(r.headers))
                assert r.status_code == 503
            seen.append(client.get("/metrics").text)
            seen.append(client.get("/readyz").text)
            assert prov.requests[0].headers["authorization"] == f"Bearer {SECRET}"
        finally:
            seen.append(router.stop())
        checked = check_config(str(tmp_path / "c.yaml"), env={**os.environ, "PROV_TEST_KEY": SECRET})
        seen.append(checked.stdout + checked.stderr)
    assert "PROV_TEST_KEY (set)" in checked.stdout
    assert not any(SECRET in text for text in seen)


def test_sigterm_lets_in_flight_streams_finish_then_exits(tmp_path):
    slow = Behavior(chunks=8, chunk_delay_s=0.25)
    with FakeUpstream("cluster", default=slow) as cluster, FakeUpstream("prov") as prov:
        router = RouterProcess(write_config(tmp_path / "c.yaml", cluster.url, prov.url))
        with streaming(router) as lines:
            router.proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            with pytest.raises(httpx.ConnectError):
                httpx.get(router.url + "/healthz")
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert len(rest) == 9  # tok1..tok7, the finish chunk, [DONE]; the usage chunk is stripped
        assert router.proc.wait(10) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once drained
        assert cluster.requests[0].completed


def test_check_config_names_the_bad_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({
        "providers": {"p": {"url": "ftp://x"}},
        "models": {"m": {"policy": "sometimes", "fallbacks": [{"provider": "q", "model": "x"}]}},
    }))
    done = check_config(str(bad))
    assert done.returncode == 2
    assert "providers.p.url" in done.stderr
    assert "models.m.policy" in done.stderr
    bad.write_text(yaml.safe_dump({"models": {"m": {"fallbacks": [{"provider": "q", "model": "x"}]}}}))
    done = check_config(str(bad))
    assert "models.m.fallbacks.0.provider: unknown provider 'q'" in done.stderr.splitlines()
    for how in (["deploy/examples/minimal.yaml"], ["--config", "deploy/examples/minimal.yaml"]):
        good = check_config(*how, cwd=Path(__file__).parent.parent)
        assert good.returncode == 0, good.stderr
        assert "TOGETHER_API_KEY" in good.stdout
    keyed = tmp_path / "keyed.yaml"
    keyed.write_text(yaml.safe_dump({"router": {"auth": {"keys_file": str(tmp_path / "absent.yaml")}},
                                     "models": {"m": {}}}))
    missing = check_config(str(keyed))
    assert missing.returncode == 2
    assert "router.auth.keys_file: cannot read" in missing.stderr


def test_sigterm_past_the_grace_period_ends_streams_with_an_error_event(tmp_path):
    slow = Behavior(chunks=20, chunk_delay_s=0.5)
    with FakeUpstream("cluster", default=slow) as cluster, FakeUpstream("prov") as prov:
        config = write_config(tmp_path / "c.yaml", cluster.url, prov.url, shutdown_grace_s=1.5)
        router = RouterProcess(config)
        with streaming(router) as lines:
            router.proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        error = json.loads(rest[-2].removeprefix("data: "))["error"]
        assert "shutting down" in error["message"] and error["code"] == "stream_interrupted"
        assert 2 <= len(rest) < 20  # some tokens made it within the grace, not all of them
        assert router.proc.wait(10) in (0, -signal.SIGTERM)


def test_a_websocket_upgrade_is_served_as_plain_http(tmp_path):
    with FakeUpstream("cluster") as cluster, FakeUpstream("prov") as prov:
        router = RouterProcess(write_config(tmp_path / "c.yaml", cluster.url, prov.url))
        try:
            upgrade = {"connection": "Upgrade", "upgrade": "websocket", "sec-websocket-version": "13",
                       "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ=="}
            r = httpx.get(router.url + "/v1/models", headers=upgrade)
        finally:
            router.stop()
    assert r.status_code == 200, r.text
    assert r.json()["data"][0]["id"] == MODEL


def test_sigterm_past_the_grace_period_answers_a_request_whose_body_is_still_arriving(tmp_path):
    with FakeUpstream("cluster") as cluster, FakeUpstream("prov") as prov:
        config = write_config(tmp_path / "c.yaml", cluster.url, prov.url, shutdown_grace_s=1)
        router = RouterProcess(config)
        with socket.create_connection(("127.0.0.1", router.port), timeout=20) as conn:
            conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                         b"content-length: 100\r\n\r\n{\"model\":")
            time.sleep(0.3)
            router.proc.send_signal(signal.SIGTERM)
            answer = b""
            while chunk := conn.recv(65536):
                answer += chunk
        output = router.stop()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503"), answer
    assert json.loads(body)["error"]["code"] == "shutting_down"
    assert "Traceback" not in output and cluster.requests == []


def test_a_router_started_with_exit_with_parent_stops_when_its_parent_is_killed(tmp_path):
    with FakeUpstream("cluster") as cluster, FakeUpstream("prov") as prov:
        config = write_config(tmp_path / "c.yaml", cluster.url, prov.url)
        port = free_port()
        # A parent that starts the router as `openweight run` does, then is killed outright.
        parent = subprocess.Popen([sys.executable, "-c", (
            "import os, subprocess, sys, time\n"
            f"child = subprocess.Popen([sys.executable, '-m', 'router.cli', 'router', '--config', {str(config)!r},"
            f" '--port', '{port}', '--exit-with-parent', str(os.getpid())], start_new_session=True)\n"
            "print(child.pid, flush=True)\n"
            "time.sleep(600)\n"
        )], stdout=subprocess.PIPE, text=True)
        assert parent.stdout is not None
        router_pid = int(parent.stdout.readline())
        deadline = time.monotonic() + 30
        while not answers(f"http://127.0.0.1:{port}/healthz"):
            assert time.monotonic() < deadline, "the router did not start"
            time.sleep(0.1)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 20
        while _alive(router_pid):
            assert time.monotonic() < deadline, "the router outlived its parent"
            time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state != "Z"  # a zombie is gone, only not yet reaped (its parent was killed)
