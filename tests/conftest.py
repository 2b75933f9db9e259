"""Shared fixtures. Helpers that tests import by name are in tests/support.py."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from router.testing import FakeUpstream


@pytest.fixture
def fakes() -> Iterator[Callable[[str], FakeUpstream]]:
    """Start fake upstreams by name; all are stopped after the test."""
    started: list[FakeUpstream] = []

    def start(name: str, **kwargs: Any) -> FakeUpstream:
        fake = FakeUpstream(name, **kwargs)
        fake.start()
        started.append(fake)
        return fake

    yield start
    for fake in started:
        fake.stop()
