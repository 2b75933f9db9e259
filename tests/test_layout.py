"""The router package's import graph, read from the source (no module is imported): no cycle, and
the modules at the bottom of the request flow import only modules below them.

Every import counts, deferred and ``TYPE_CHECKING`` ones included: a cycle hidden behind either
still ties the modules together.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: str) -> dict[str, set[str]]:
    """Each module of `package` -> the modules of `package` it imports."""
    files = {_module_name(path): path for path in (ROOT / package).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".")
                    anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                    base = ".".join([*anchor, base] if base else anchor)
                # `from package import module` imports the module; `from module import name` the module.
                imported.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base
                                for alias in node.names)
        graph[name] = {target for target in imported if target in files and target != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as the list of modules along it (first repeated last), or None."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        if node in path:
            return [*path[path.index(node):], node]
        if node in done:
            return None
        path.append(node)
        for target in sorted(graph[node]):
            if (cycle := visit(target)) is not None:
                return cycle
        path.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        if (cycle := visit(start)) is not None:
            return cycle
    return None


def test_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_graph_reads_every_form_of_import() -> None:
    graph = import_graph("router")
    assert {"router.asgi", "router.dispatch", "router.endpoints"} <= graph["router.app"]
    assert "router.policy" in graph["router.endpoints"]  # `from router import policy`
    assert "router.app" in graph["router.cli"]  # deferred, inside a function


def test_router_has_no_import_cycle() -> None:
    cycle = find_cycle(import_graph("router"))
    assert cycle is None, " -> ".join(cycle or [])


def test_the_lowest_modules_import_only_lower_ones() -> None:
    graph = import_graph("router")
    allowed = {
        "router.outcomes": set(),
        "router.config_model": set(),
        "router.redaction": set(),
        "router.cluster_routes": set(),
        "router.spend_config": {"router.config_model"},
        "router.capacity_config": {"router.config_model"},
        "router.settings": {"router.spend_config", "router.capacity_config", "router.config_model",
                            "router.cluster_routes", "router.redaction"},
        "router.errors": {"router.outcomes"},
        "router.metrics": {"router.outcomes"},
        "router.asgi": {"router.errors", "router.outcomes"},
    }
    assert {name: graph[name] - lower for name, lower in allowed.items()} == {name: set() for name in allowed}
