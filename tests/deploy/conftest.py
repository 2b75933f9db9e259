"""Fixtures for the deployment checks: the validator tools and the chart rendered per scenario.

The tools are installed by ``tools/install-validators.sh`` (helm into .cache/bin, promtool from
Debian, kubernetes-validate into the venv, tsc and the schema packages into .cache/node). A missing
tool fails the test that needs it with the command to run: nothing here is skipped silently.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.deploy import support


@pytest.fixture(scope="session")
def helm() -> str:
    return support.require_tool("helm")


@pytest.fixture(scope="session")
def promtool() -> str:
    return support.require_tool("promtool")


@pytest.fixture(scope="session")
def rendered(helm: str) -> dict[str, list[support.Doc]]:
    """Every scenario (defaults and each ci/ values file) rendered once: name -> objects."""
    return {name: support.render(helm, values) for name, values in support.scenarios().items()}


@pytest.fixture(scope="session")
def all_docs(rendered: dict[str, list[support.Doc]]) -> list[tuple[str, support.Doc]]:
    return [(name, doc) for name, docs in rendered.items() for doc in docs]


@pytest.fixture
def node_workdir() -> Iterator[support.NodeWorkdir]:
    with support.NodeWorkdir() as work:
        yield work
