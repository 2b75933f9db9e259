"""The router as a child process of the local stack: start it, wait until it answers, stop it.

The child is ``python -m router.cli router --config FILE --exit-with-parent PID``: the kernel
signals it when this process dies, even when it is killed outright, so it never outlives the stack.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from cluster.errors import StackError


@dataclass(kw_only=True)
class RouterProcess:
    """One router child process; :meth:`start`, then :meth:`wait` or :meth:`stop`."""

    config_path: Path
    url: str
    """Where it answers once started, e.g. ``http://127.0.0.1:8000``."""
    grace_s: float
    """How long :meth:`stop` lets it drain after SIGTERM before SIGKILL."""
    output: IO[Any] | None = None
    """Where its stdout/stderr go (default: this process's)."""
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self, timeout_s: float = 60.0) -> None:
        """Start the router and return once it answers; :class:`StackError` when it exits or stays silent."""
        command = [sys.executable, "-m", "router.cli", "router", "--config", str(self.config_path),
                   "--exit-with-parent", str(os.getpid())]
        out = self.output
        # Its own session: a terminal's Ctrl-C reaches this process, which stops the router (SIGTERM).
        self._process = process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT if out else None,
                                                   start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            code = process.poll()
            if code is not None:
                raise StackError(f"the router exited with status {code}")
            try:
                urllib.request.urlopen(f"{self.url}/v1/models", timeout=2).close()
                return
            except urllib.error.HTTPError:
                return  # it answers (e.g. 401 without a key)
            except OSError:
                time.sleep(0.3)
        raise StackError(f"the router did not answer on {self.url} within {timeout_s:.0f} s")

    def wait(self) -> int:
        """Block until the router exits; its exit status."""
        if self._process is None:
            raise StackError("the router was not started")
        return self._process.wait()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after the grace period. Safe to call more than once."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=self.grace_s + 5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
