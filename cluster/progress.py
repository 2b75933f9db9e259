"""How the cluster side reports progress: one line at a time, to a callback the caller chooses."""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str], None]
"""Called with one line of progress (``print`` on the command line)."""


def quiet(_: str) -> None:
    """A :data:`Progress` that shows nothing."""
