"""The ``openweight`` command: each part's verbs, put together in one place, and the layers kept apart."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from openweight.cli import BENCH_MISSING, build_parser

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, cwd=ROOT)


def test_every_part_adds_its_verbs() -> None:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices or ()) == {"router", "check-config", "cluster", "model", "run", "bench"}


def test_the_router_imports_neither_the_cluster_side_nor_the_benchmarks() -> None:
    done = _python(
        "import sys, router.cli, router.app, router.server, router.testing\n"
        "router.cli.build_parser()\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'cluster', 'bench', 'openweight'}))\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_cluster_side_does_not_import_the_command_line_of_the_router_or_the_benchmarks() -> None:
    done = _python(
        "import sys, cluster.cli, cluster.stack, cluster.foreground, cluster.runtime\n"
        "print(sorted(m for m in sys.modules if m in ('router.cli', 'bench', 'openweight')))\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_without_the_bench_package_openweight_bench_says_how_to_install_it() -> None:
    # What the router image has: no `bench` package (an import of it fails as if it were absent).
    done = _python(
        "import sys\n"
        "sys.modules['bench'] = None\n"
        "from openweight.cli import main\n"
        "sys.exit(main(['bench', 'router', '--requests', '1']))\n"
    )
    assert done.returncode == 2
    assert done.stderr.strip().endswith(BENCH_MISSING)


def test_a_broken_bench_package_fails_loudly(tmp_path: Path) -> None:
    """A missing name inside the package is a bug, not an absent part: the command must not hide it."""
    broken = tmp_path / "bench"
    broken.mkdir()
    (broken / "__init__.py").write_text("from bench.nowhere import register\n")
    done = subprocess.run(
        [sys.executable, "-c", "from openweight.cli import main; main(['--help'])"],
        capture_output=True, text=True, check=False, cwd=tmp_path, env={"PYTHONPATH": f"{tmp_path}:{ROOT}"},
    )
    assert done.returncode != 0
    assert "No module named 'bench.nowhere'" in done.stderr


@pytest.mark.parametrize("argv", [["--help"], ["bench", "--help"], ["cluster", "--help"]])
def test_python_dash_m_openweight_is_the_command(argv: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "openweight", *argv], capture_output=True, text=True,
                          check=False, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: openweight")
