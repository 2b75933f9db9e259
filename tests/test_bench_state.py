"""`openweight bench router` with shared state: in-process and Redis targets side by side, one run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from openweight.cli import main


@pytest.mark.parametrize("route", ["cluster", "provider"])
def test_router_suite_compares_redis_state_with_in_process_state(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], route: str
) -> None:
    code = main(["bench", "router", "--requests", "20", "--concurrency", "1", "--chunks", "5", "--no-chart",
                 "--targets", "direct,openweight-keyed,openweight-redis", "--state-route", route,
                 "--out", str(tmp_path)])
    assert code == 0
    (report_file,) = tmp_path.glob("router-*.json")
    report = json.loads(report_file.read_text())
    rows = report["rows"]
    assert {(r["target"], r["mode"]) for r in rows} == {
        (t, m) for t in ("direct", "openweight-keyed", "openweight-redis") for m in ("plain", "stream")}
    assert all(r["errors"] == 0 for r in rows)
    assert all(r["redis_cpu_ms_per_request"] >= 0 for r in rows if r["target"] == "openweight-redis")
    assert report["settings"]["state_route"] == route
    lines = [line for line in report["summary"] if line.startswith("redis state")]
    assert len(lines) == 4 and all("ms router CPU" in line for line in lines)
    assert sum("isolated" in line for line in lines) == 2
    assert "redis state, plain c=1" in capsys.readouterr().out
