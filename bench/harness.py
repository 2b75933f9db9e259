"""What every benchmark suite shares: processes to measure, their CPU and memory, and the load.

Each server under test (fake upstreams, the router, LiteLLM, vLLM) runs in a process of its own on a
free port of 127.0.0.1; the load generator runs in the benchmark's process. CPU time comes from
``/proc/PID/stat`` of a process and its descendants (clock ticks, usually 10 ms: measure hundreds
of requests), memory from ``/proc/PID/status``.

The load is closed-loop: ``concurrency`` workers, each with a keep-alive connection of its own,
send the next request as soon as the previous answer is complete. A client per worker rather than
one shared pool: with httpx a shared pool of 32 connections cost the client so much that it, not
the server, set the latency (encode/httpx#3215); aiohttp is cheaper still per request, which
matters when the load generator shares two cores with the servers it measures.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import shlex
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import aiohttp

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")
_COMPLETION_TOKENS = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')


class BenchError(RuntimeError):
    """A process a suite needs did not start, did not answer, or is not there."""


def _stat_fields(pid: int) -> list[str]:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2:].split()  # the name in parentheses may contain spaces


def descendants(pid: int) -> list[int]:
    """``pid`` and every live process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                children.setdefault(int(_stat_fields(int(entry))[1]), []).append(int(entry))
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        queue.extend(children.get(current, ()))
    return found


def cpu_seconds(pid: int, *, tree: bool = False) -> float:
    """User + system CPU time of ``pid`` (and, with ``tree``, of its live descendants)."""
    total = 0.0
    for each in descendants(pid) if tree else [pid]:
        with contextlib.suppress(OSError, IndexError):
            fields = _stat_fields(each)
            total += (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    return total


def rss_bytes(pid: int, *, tree: bool = False) -> int:
    """Resident memory of ``pid`` (and, with ``tree``, of its live descendants)."""
    total = 0
    for each in descendants(pid) if tree else [pid]:
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += int(Path(f"/proc/{each}/statm").read_text().split()[1]) * _PAGE
    return total


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (NaN when empty)."""
    if not sorted_values:
        return float("nan")
    return sorted_values[max(0, min(len(sorted_values) - 1, math.ceil(q * len(sorted_values)) - 1))]


def answers(url: str, timeout: float = 1.0) -> bool:
    """Whether ``url`` answers 200 now."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def listening(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port`` now."""
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def service(name: str, argv: list[str], ready: str | Callable[[], bool] | None, log: IO[bytes], *,
            env: Mapping[str, str] | None = None, ready_timeout_s: float = 60.0) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``argv`` until the block ends (SIGTERM to its process group, then SIGKILL); first wait until
    it is ready: ``ready`` is a URL that must answer 200, or a check (when given)."""
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=dict(env) if env else None,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + ready_timeout_s
        is_ready = (lambda: answers(ready)) if isinstance(ready, str) else ready
        while is_ready is not None and not is_ready():
            if process.poll() is not None:
                raise BenchError(f"{name} exited with status {process.returncode}: {shlex.join(argv)}")
            if time.monotonic() > deadline:
                where = f" at {ready}" if isinstance(ready, str) else ""
                raise BenchError(f"{name} did not become ready{where} within {ready_timeout_s:.0f} s")
            time.sleep(0.1)
        yield process
    finally:
        stop_group(process)


@contextlib.contextmanager
def workspace() -> Iterator[tuple[Path, IO[bytes]]]:
    """A suite's scratch folder and the log its child processes write (``processes.log``). When a
    child does not start or answer (:class:`BenchError`), the log's tail is printed before the error goes on."""
    with tempfile.TemporaryDirectory(prefix="openweight-bench-") as tmp, \
            open(Path(tmp) / "processes.log", "w+b") as log:
        try:
            yield Path(tmp), log
        except BenchError:
            log.seek(0)
            print(log.read().decode(errors="replace")[-6000:])
            raise


def stop_group(process: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """SIGTERM the process group started with ``process``, then SIGKILL what is left."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, 15)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(grace_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, 9)
    process.wait()


@dataclass(slots=True)
class Result:
    """One request as the client saw it."""

    status: int = 0
    seconds: float = 0.0
    ttft_s: float | None = None
    """Until the first body bytes (streams: the first event)."""
    events: int = 0
    done: bool = False
    """Streams: ended with ``data: [DONE]``."""
    error_event: bool = False
    """Streams: carried an in-band error event."""
    completion_tokens: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    """Client-side failure (connection, timeout), when there was no answer."""
    started_at: float = 0.0

    @property
    def ok(self) -> bool:
        """A 200 with a complete answer and no error event."""
        if self.status != 200 or self.error is not None or self.error_event:
            return False
        return self.done or self.events == 0


async def fetch(session: aiohttp.ClientSession, url: str, body: bytes, *, headers: Mapping[str, str] | None = None,
                keep_headers: tuple[str, ...] = ()) -> Result:
    """Send one POST and read the whole answer; never raises for a failed request."""
    result = Result(started_at=time.perf_counter())
    tail = b""
    try:
        async with session.post(url, data=body, headers={"content-type": "application/json", **(headers or {})}) as r:
            result.status = r.status
            result.headers = {k: r.headers[k] for k in keep_headers if k in r.headers}
            async for part in r.content.iter_any():
                if result.ttft_s is None:
                    result.ttft_s = time.perf_counter() - result.started_at
                result.events += part.count(b"data: ")
                tail = (tail + part)[-2048:]
    except (aiohttp.ClientError, TimeoutError) as exc:
        result.error = type(exc).__name__
    result.seconds = time.perf_counter() - result.started_at
    if result.events:
        result.done = tail.rstrip().endswith(b"data: [DONE]")
        result.error_event = b'data: {"error"' in tail
    if found := _COMPLETION_TOKENS.findall(tail):
        result.completion_tokens = int(found[-1])
    return result


def client_session(timeout_s: float = 300.0, connections: int = 1) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connections, force_close=False),
        timeout=aiohttp.ClientTimeout(total=timeout_s), auto_decompress=False, skip_auto_headers=("user-agent",),
    )


@dataclass
class Load:
    """What one load run measured."""

    results: list[Result]
    seconds: float
    cpu_s: dict[str, float]
    """CPU seconds of each watched process (tree) during the run."""


async def run_load(
    url: str, body: bytes, *, concurrency: int, requests: int | None = None, duration_s: float | None = None,
    watch: Mapping[str, int] | None = None, tree: bool = True, warmup: int = 2, timeout_s: float = 300.0,
    keep_headers: tuple[str, ...] = (), on_result: Callable[[Result], Awaitable[None] | None] | None = None,
) -> Load:
    """``requests`` requests (or as many as fit in ``duration_s``) from ``concurrency`` workers.

    Every worker first sends ``warmup`` requests that are not recorded (opening its connection and
    letting the servers settle); CPU of the ``watch`` processes is counted from the end of the warm-up.
    """
    watch = watch or {}
    results: list[Result] = []

    async def worker(session: aiohttp.ClientSession, count: int | None, until: float | None) -> None:
        sent = 0
        while (count is None or sent < count) and (until is None or time.monotonic() < until):
            result = await fetch(session, url, body, keep_headers=keep_headers)
            sent += 1
            results.append(result)
            if on_result is not None and (pending := on_result(result)) is not None:
                await pending

    async with contextlib.AsyncExitStack() as stack:
        sessions = [await stack.enter_async_context(client_session(timeout_s)) for _ in range(concurrency)]
        if warmup:
            await asyncio.gather(*(fetch(s, url, body) for s in sessions for _ in range(warmup)))
        if requests is not None:
            shares: list[int | None] = [requests // concurrency + (i < requests % concurrency)
                                        for i in range(concurrency)]
        else:
            shares = [None] * concurrency
        until = time.monotonic() + duration_s if duration_s is not None else None
        cpu_before = {name: cpu_seconds(pid, tree=tree) for name, pid in watch.items()}
        started = time.perf_counter()
        await asyncio.gather(*(worker(s, n, until) for s, n in zip(sessions, shares, strict=True)))
        seconds = time.perf_counter() - started
        cpu = {name: cpu_seconds(pid, tree=tree) - cpu_before[name] for name, pid in watch.items()}
    return Load(results, seconds, cpu)
