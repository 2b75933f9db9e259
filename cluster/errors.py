"""The cluster side's errors: one tree, and one map from a failure to a command's exit status.

::

    ClusterError              the cluster side could not do what was asked      exit status 1
    ├── ClusterConfigError    the config file cannot be used (also a             exit status 2
    │                         :class:`router.settings.ConfigError`)
    ├── ModelError            a built-in model cannot be fetched, checked or converted
    ├── ServeError            Ray or Serve did not do what was asked (start, deploy, become ready)
    └── StackError            the local stack could not start or keep running (a port in use,
                              the router exited)

Ray's own exceptions become :class:`ServeError` where Ray is called (:mod:`cluster.runtime`).
:func:`failure` is the one place that turns an exception into the line and exit status a
command ends with (:mod:`cluster.cli`).
"""

from __future__ import annotations

from typing import ClassVar

from router.settings import ConfigError


class ClusterError(Exception):
    """Base of every error the cluster side raises on purpose; ``exit_code`` is the command's exit status."""

    exit_code: ClassVar[int] = 1


class ClusterConfigError(ClusterError, ConfigError):
    """The config file cannot be used for the cluster; the message names every bad key."""

    exit_code = 2


class ModelError(ClusterError):
    """A built-in model cannot be fetched, checked or converted."""


class ServeError(ClusterError):
    """Ray or Serve did not do what was asked (start, deploy, become ready)."""


class StackError(ClusterError):
    """The local stack could not start, or a part of it stopped (a port in use, the router exited)."""


_RAY = "pip install 'openweight[cluster]'"
_VLLM = "pip install 'openweight[cpu]', or 'openweight[gpu]' on NVIDIA GPUs"
_INSTALL = {"ray": _RAY, "pyarrow": _RAY, "pandas": _RAY, "jsonref": _RAY,
            "vllm": _VLLM, "torch": _VLLM, "transformers": _VLLM, "gguf": _VLLM, "accelerate": _VLLM}
"""Optional dependencies the cluster side imports when a command needs them, and how to install each."""


def failure(exc: BaseException) -> tuple[str, int] | None:
    """The message and exit status a command ends with after ``exc``; None when ``exc`` is a bug to let through.

    Config errors (the router's own, or :class:`ClusterConfigError`) exit 2, the rest of the tree
    with its ``exit_code``, a missing optional dependency (Ray, vLLM) and what the system refused
    (a folder that cannot be written, a file that cannot be read) 1.
    """
    if isinstance(exc, ClusterError):
        return str(exc), exc.exit_code
    if isinstance(exc, ConfigError):
        return str(exc), ClusterConfigError.exit_code
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        install = _INSTALL.get(exc.name.split(".")[0])
        if install is not None:
            return f"{exc.name} is not installed ({install})", 1
    if isinstance(exc, OSError):
        return str(exc), 1
    return None
