"""A suite's report: the same figures as a printed table, a JSON file and a PNG chart.

Every report records where and when it was measured (CPU, cores, Python, kernel, the load average
before and after: other work on a small machine moves the figures) and the command that produced
it. Files go to ``bench-results/`` unless ``--out DIR``: ``<suite>-<UTC time>.json`` and ``.png``.
Charts need matplotlib (the ``bench`` extra); without it the table and the JSON are still written.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import platform
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.harness import load_average

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DEFAULT_OUT = Path("bench-results")


def machine() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        memory = round(int(Path("/proc/meminfo").read_text().split()[1]) / 2**20, 1)
    return {"cpu": model, "cores": os.cpu_count(), "memory_gib": memory, "python": platform.python_version(),
            "system": f"{platform.system()} {platform.release()}"}


def command() -> str:
    """How this benchmark was started, as a user would type it."""
    program = sys.argv[0]
    if program.endswith((os.path.join("openweight", "__main__.py"), os.path.join("openweight", "cli.py"))):
        return shlex.join(["python", "-m", "openweight", *sys.argv[1:]])
    return shlex.join([os.path.basename(program), *sys.argv[1:]])


def new_report(suite: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The head of a report; the suite adds ``rows`` (and anything else) and :func:`finish` closes it."""
    return {
        "suite": suite,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "command": command(),
        "load_average_before": [round(x, 2) for x in load_average()],
        "settings": settings,
        "rows": [],
    }


@dataclass(frozen=True)
class Column:
    """One column of a printed table: the row key, its header and how to print it."""

    key: str
    header: str
    width: int = 9
    digits: int = 2

    def cell(self, row: dict[str, Any]) -> str:
        value = row.get(self.key)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return f"{'-':>{self.width}}"
        if isinstance(value, bool):
            return f"{'yes' if value else 'no':>{self.width}}"
        if isinstance(value, float):
            return f"{value:>{self.width}.{self.digits}f}"
        return f"{value!s:>{self.width}}"


def table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    lines = [" ".join(f"{c.header:>{c.width}}" for c in columns)]
    lines += [" ".join(c.cell(row) for c in columns) for row in rows]
    return "\n".join(lines)


def header(report: dict[str, Any]) -> str:
    m = report["machine"]
    load = " ".join(f"{x:.2f}" for x in report["load_average_before"])
    after = report.get("load_average_after")
    if after:
        load += " -> " + " ".join(f"{x:.2f}" for x in after)
    return "\n".join([
        f"openweight bench {report['suite']}  {report['date']}",
        f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, Python {m['python']}, {m['system']}",
        f"load average (1, 5, 15 min): {load}",
        f"command: {report['command']}",
    ])


def finish(report: dict[str, Any], text: str, out: Path | None,
           chart: Callable[[dict[str, Any]], Figure] | None) -> dict[str, Path]:
    """Print ``text`` under the report's header; write the JSON and the chart. Returns the files."""
    report["load_average_after"] = [round(x, 2) for x in load_average()]
    print(header(report))
    print()
    print(text, flush=True)
    directory = out or DEFAULT_OUT
    directory.mkdir(parents=True, exist_ok=True)
    stamp = report["date"].replace(":", "").replace("+0000", "Z").replace("+00:00", "Z")
    files = {"json": directory / f"{report['suite']}-{stamp}.json"}
    files["json"].write_text(json.dumps(report, indent=2) + "\n")
    if chart is not None:
        try:
            figure = chart(report)
        except ImportError:
            print("(no chart: matplotlib is not installed; pip install 'openweight[bench]')", file=sys.stderr)
        else:
            files["png"] = directory / f"{report['suite']}-{stamp}.png"
            figure.savefig(files["png"], dpi=90)
    print("\n" + "\n".join(f"{kind}: {path}" for kind, path in files.items()), flush=True)
    return files


def figure(panels: int, title: str, width: float = 4.2, height: float = 3.4) -> tuple[Figure, list[Any]]:
    """A row of ``panels`` axes (matplotlib without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * panels, height), layout="constrained")
    axes = [fig.add_subplot(1, panels, i + 1) for i in range(panels)]
    fig.suptitle(title, fontsize=10)
    return fig, axes


def log_axis(ax: Any, axis: str, **kwargs: Any) -> bool:
    """A log scale on `axis` (``"x"`` or ``"y"``) when what is plotted has a positive value, else
    linear: a short run may measure nothing (0 CPU ticks), and the chart must still draw. Returns
    whether the scale is logarithmic."""
    values = [v for line in ax.get_lines() for v in (line.get_xdata() if axis == "x" else line.get_ydata())]
    if not any(v > 0 for v in values):
        return False
    (ax.set_xscale if axis == "x" else ax.set_yscale)("log", **kwargs)
    return True
