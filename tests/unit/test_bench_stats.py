"""Unit tests for the load benchmark's pure parts: statistics, rendering, /proc parsing, request handling."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench import bench as bench_mod
from bench.report import (
    COLUMNS,
    plot_png,
    read_json,
    render_markdown,
    render_markdown_table,
    render_table,
    write_json,
    write_reports,
)
from bench.rss import PeakRssSampler, parse_ppid, parse_vmrss_kib, tree_rss_kib
from bench.stats import (
    LevelStats,
    Outcome,
    RequestResult,
    aggregate,
    engine_ratios,
    mean,
    percentile,
    safe_ratio,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
METADATA: dict[str, Any] = {
    "date": "2025-01-02T03:04:05+00:00",
    "model": "tiny-model",
    "machine": {"processor": "x86_64", "cpu_model": "Test CPU", "cpu_count": 4, "gpus": []},
    "args": {"max_new_tokens": 64, "concurrency": [1, 8]},
}


def level(engine: str, concurrency: int, throughput: float, p95_ms: float | None, **overrides: Any) -> LevelStats:
    values: dict[str, Any] = {
        "engine": engine,
        "concurrency": concurrency,
        "completed": 8,
        "failed": 0,
        "rejected": 0,
        "duration_s": 2.0,
        "request_throughput": 4.0,
        "output_throughput": throughput,
        "total_input_tokens": 96,
        "total_output_tokens": 512,
        "mean_e2el_ms": 100.0,
        "p50_e2el_ms": 90.0,
        "p95_e2el_ms": p95_ms,
        "p99_e2el_ms": 150.0,
        "p50_ttft_ms": 10.0,
        "p95_ttft_ms": 20.0,
        "peak_rss_mib": 512.0,
    }
    values.update(overrides)
    return LevelStats(**values)


RECORDS = [
    level("batched", 1, 100.0, 200.0),
    level("batched", 8, 600.0, 300.0),
    level("threadpool", 1, 50.0, 400.0),
    level("threadpool", 8, 150.0, 1200.0, peak_rss_mib=None, p50_ttft_ms=None),
]


# --- percentiles and aggregation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("q", "expected"),
    [(0, 1.0), (25, 1.75), (50, 2.5), (95, 3.85), (99, 3.97), (100, 4.0)],
)
def test_percentile_interpolates_linearly(q: float, expected: float) -> None:
    # rank = q/100 * (n-1); e.g. p95 of 4 values: rank 2.85 -> 3 + 0.85 * (4 - 3)
    assert percentile([4.0, 1.0, 3.0, 2.0], q) == pytest.approx(expected)


def test_percentile_matches_hand_computed_values_on_ten_items() -> None:
    values = [float(v) for v in range(10, 110, 10)]  # 10..100
    assert percentile(values, 50) == pytest.approx(55.0)  # rank 4.5
    assert percentile(values, 90) == pytest.approx(91.0)  # rank 8.1
    assert percentile(values, 99) == pytest.approx(99.1)  # rank 8.91


def test_percentile_edge_cases() -> None:
    assert percentile([], 50) is None
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        percentile([1.0], 101)
    assert mean([]) is None
    assert mean([1.0, 2.0, 6.0]) == pytest.approx(3.0)


def test_aggregate_counts_outcomes_and_uses_completed_requests_only() -> None:
    results = [
        RequestResult(Outcome.COMPLETED, 0.1, prompt_tokens=12, completion_tokens=8, ttft_s=0.01, model="m"),
        RequestResult(Outcome.COMPLETED, 0.3, prompt_tokens=12, completion_tokens=8, ttft_s=0.02, model="m"),
        RequestResult(Outcome.COMPLETED, 0.2, prompt_tokens=12, completion_tokens=8, ttft_s=None, model="m"),
        RequestResult(Outcome.FAILED, 5.0, error="boom"),
        RequestResult(Outcome.REJECTED, 0.001, error="HTTP 503"),
    ]
    stats = aggregate("batched", 4, results, duration_s=2.0, peak_rss_mib=321.5)
    assert (stats.engine, stats.concurrency) == ("batched", 4)
    assert (stats.completed, stats.failed, stats.rejected) == (3, 1, 1)
    assert stats.total_output_tokens == 24 and stats.total_input_tokens == 36
    assert stats.request_throughput == pytest.approx(1.5)
    assert stats.output_throughput == pytest.approx(12.0)
    assert stats.mean_e2el_ms == pytest.approx(200.0)
    assert stats.p50_e2el_ms == pytest.approx(200.0)
    assert stats.p95_e2el_ms == pytest.approx(290.0)  # rank 1.9 of [100, 200, 300]
    assert stats.p99_e2el_ms == pytest.approx(298.0)  # rank 1.98
    assert stats.p50_ttft_ms == pytest.approx(15.0)  # the null TTFT is skipped
    assert stats.p95_ttft_ms == pytest.approx(19.5)
    assert stats.peak_rss_mib == 321.5


def test_aggregate_with_nothing_completed() -> None:
    stats = aggregate("threadpool", 1, [RequestResult(Outcome.FAILED, 1.0, error="x")], duration_s=1.0)
    assert stats.completed == 0 and stats.failed == 1
    assert stats.request_throughput == 0.0 and stats.output_throughput == 0.0
    assert stats.mean_e2el_ms is None and stats.p95_e2el_ms is None and stats.p50_ttft_ms is None
    assert aggregate("x", 1, [], duration_s=0.0).output_throughput == 0.0


# --- ratios -------------------------------------------------------------------------------------------


def test_engine_ratios_cover_shared_concurrencies_only() -> None:
    records = [*RECORDS, level("threadpool", 32, 10.0, 1.0)]
    ratios = engine_ratios(records)
    assert [r.concurrency for r in ratios] == [1, 8]
    assert ratios[0].output_throughput_ratio == pytest.approx(2.0)
    assert ratios[0].p95_e2el_ratio == pytest.approx(0.5)
    assert ratios[1].output_throughput_ratio == pytest.approx(4.0)
    assert ratios[1].p95_e2el_ratio == pytest.approx(0.25)
    assert engine_ratios([r for r in records if r.engine == "batched"]) == []


def test_ratio_undefined_for_zero_or_missing_denominator() -> None:
    assert safe_ratio(1.0, 0.0) is None and safe_ratio(None, 1.0) is None and safe_ratio(1.0, None) is None
    ratios = engine_ratios([level("batched", 1, 10.0, None), level("threadpool", 1, 0.0, 5.0)])
    assert ratios[0].output_throughput_ratio is None and ratios[0].p95_e2el_ratio is None


def test_markdown_ratio_lines() -> None:
    text = render_markdown(RECORDS, METADATA)
    assert "## batched vs threadpool" in text
    assert "- C=1: batched/threadpool output throughput 2.00x, p95 latency 0.50x" in text
    assert "- C=8: batched/threadpool output throughput 4.00x, p95 latency 0.25x" in text
    single = render_markdown([r for r in RECORDS if r.engine == "batched"], METADATA)
    assert "batched/threadpool" not in single
    undefined = render_markdown([level("batched", 1, 1.0, None), level("threadpool", 1, 0.0, 1.0)], METADATA)
    assert "- C=1: batched/threadpool output throughput n/a, p95 latency n/a" in undefined


# --- tables -------------------------------------------------------------------------------------------


def test_markdown_table_header_and_rows() -> None:
    lines = render_markdown_table(RECORDS).splitlines()
    assert lines[0] == (
        "| engine | C | completed | failed | rejected | duration_s | req/s | out tok/s | out tokens | mean e2el ms "
        "| p50 e2el ms | p95 e2el ms | p99 e2el ms | p50 ttft ms | p95 ttft ms | peak RSS MiB |"
    )
    assert lines[1].startswith("| :--- | ---: |") and lines[1].count("|") == len(COLUMNS) + 1
    assert len(lines) == 2 + len(RECORDS)
    assert lines[2] == "| batched | 1 | 8 | 0 | 0 | 2.00 | 4.00 | 100.0 | 512 | 100 | 90 | 200 | 150 | 10 | 20 | 512 |"
    assert lines[5] == (
        "| threadpool | 8 | 8 | 0 | 0 | 2.00 | 4.00 | 150.0 | 512 | 100 | 90 | 1200 | 150 | - | 20 | - |"
    )


def test_markdown_document_has_context_and_table() -> None:
    text = render_markdown(RECORDS, METADATA)
    assert text.startswith("# Load benchmark\n")
    assert "- model: tiny-model" in text
    assert "- machine: Test CPU, 4 CPUs" in text
    assert "- max_new_tokens: 64" in text
    assert "| engine | C |" in text


def test_text_table_is_aligned() -> None:
    lines = render_table(RECORDS).splitlines()
    assert lines[0].split()[:3] == ["engine", "C", "completed"]
    assert set(lines[1]) <= {"-", " "}
    assert len(lines) == 2 + len(RECORDS)
    assert lines[2].startswith("batched ") and lines[4].startswith("threadpool ")
    # Numbers are right-aligned: each row ends where the rule does.
    assert lines[2].endswith("512") and lines[5].endswith("-")
    assert all(len(line) == len(lines[1]) for line in lines[2:])


# --- JSON and PNG -------------------------------------------------------------------------------------


def test_json_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    write_json(path, RECORDS, METADATA)
    records, metadata = read_json(path)
    assert records == RECORDS
    assert metadata == METADATA
    raw = json.loads(path.read_text())
    assert set(raw) == {"metadata", "results"}
    assert raw["results"][0]["output_throughput"] == 100.0 and raw["results"][3]["peak_rss_mib"] is None


def test_png_is_written(tmp_path: Path) -> None:
    path = tmp_path / "chart.png"
    plot_png(path, RECORDS, "title")
    assert path.read_bytes().startswith(PNG_SIGNATURE)


def test_write_reports_writes_three_files(tmp_path: Path) -> None:
    paths = write_reports(tmp_path / "out", RECORDS, METADATA)
    assert [p.name for p in paths] == ["results.json", "results.md", "results.png"]
    assert all(p.stat().st_size > 0 for p in paths)
    assert paths[2].read_bytes().startswith(PNG_SIGNATURE)


# --- /proc parsing ------------------------------------------------------------------------------------


def test_parse_proc_files() -> None:
    assert parse_vmrss_kib("Name:\tpython\nVmPeak:\t  999 kB\nVmRSS:\t   12345 kB\n") == 12345
    assert parse_vmrss_kib("Name:\tzombie\nState:\tZ\n") is None
    assert parse_ppid("42 (odd) name)) S 7 42 42 0 -1") == 7
    assert parse_ppid("garbage") is None


def _fake_process(proc: Path, pid: int, ppid: int, rss_kib: int) -> None:
    folder = proc / str(pid)
    folder.mkdir()
    (folder / "stat").write_text(f"{pid} (py thon) S {ppid} 1 1 0")
    (folder / "status").write_text(f"Name:\tpy\nVmRSS:\t{rss_kib} kB\n")


def test_tree_rss_sums_descendants_only(tmp_path: Path) -> None:
    _fake_process(tmp_path, 10, 1, 1000)
    _fake_process(tmp_path, 11, 10, 200)
    _fake_process(tmp_path, 12, 11, 30)
    _fake_process(tmp_path, 20, 1, 5000)  # unrelated
    (tmp_path / "self").mkdir()
    assert tree_rss_kib(10, tmp_path) == 1230
    assert tree_rss_kib(11, tmp_path) == 230
    assert tree_rss_kib(99, tmp_path) is None
    with PeakRssSampler(10, interval_s=0.01, proc=tmp_path) as sampler:
        pass
    assert sampler.peak_mib == pytest.approx(1230 / 1024)
    with PeakRssSampler(None) as nothing:
        pass
    assert nothing.peak_mib is None


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_tree_rss_of_this_process() -> None:
    assert (tree_rss_kib(os.getpid()) or 0) > 0


# --- request handling ---------------------------------------------------------------------------------


def _ok_body(completion_tokens: int = 8, ttft: float | None = 0.05) -> dict[str, Any]:
    return {
        "generated_text": "x",
        "model": "tiny",
        "request_id": "r",
        "prompt_tokens": 12,
        "completion_tokens": completion_tokens,
        "finish_reason": "length",
        "timings": {"queue_s": 0.0, "time_to_first_token_s": ttft, "total_s": 0.1},
    }


def test_result_from_response_classifies() -> None:
    ok = bench_mod.result_from_response(200, _ok_body(), 0.25)
    assert ok == RequestResult(Outcome.COMPLETED, 0.25, 12, 8, 0.05, "tiny")
    assert bench_mod.result_from_response(200, _ok_body(ttft=None), 0.25).ttft_s is None
    assert bench_mod.result_from_response(503, {"detail": "full"}, 0.01).outcome is Outcome.REJECTED
    assert bench_mod.result_from_response(500, "oops", 0.01).outcome is Outcome.FAILED
    assert bench_mod.result_from_response(422, {"detail": []}, 0.01).outcome is Outcome.FAILED
    malformed = bench_mod.result_from_response(200, {"generated_text": "x"}, 0.01)
    assert malformed.outcome is Outcome.FAILED and "malformed" in (malformed.error or "")
    assert bench_mod.result_from_response(200, "not json", 0.01).outcome is Outcome.FAILED


def test_payload_and_level_sizes() -> None:
    first, second = bench_mod.build_payload(0, 16), bench_mod.build_payload(1, 16)
    assert first["prompt"] != second["prompt"]
    assert first | {"prompt": ""} == {
        "prompt": "",
        "max_new_tokens": 16,
        "ignore_eos": True,
        "temperature": 0.8,
        "top_p": 0.95,
    }
    assert bench_mod.requests_for_level(1, None) == 8
    assert bench_mod.requests_for_level(32, None) == 64
    assert bench_mod.requests_for_level(32, 5) == 5


def test_server_env_isolates_job_store_and_passes_user_settings(tmp_path: Path) -> None:
    base = {"TEXTGEN_MODEL": "my/model", "TEXTGEN_DTYPE": "bfloat16", "TEXTGEN_ENGINE": "x", "PATH": "/bin"}
    env = bench_mod.server_env("threadpool", tmp_path / "jobs.db", base)
    assert env["TEXTGEN_ENGINE"] == "threadpool"
    assert env["TEXTGEN_JOB_STORE"] == f"sqlite:///{tmp_path}/jobs.db"
    assert env["TEXTGEN_JOB_STORE"].startswith("sqlite:////")
    assert env["TEXTGEN_MAX_WAITING"] == "1024"
    assert env["TEXTGEN_MODEL"] == "my/model" and env["TEXTGEN_DTYPE"] == "bfloat16" and env["PATH"] == "/bin"


def test_parse_args() -> None:
    args = bench_mod.parse_args([])
    assert args.engines == ["batched", "threadpool"] and args.concurrency == [1, 8, 32, 64]
    assert args.max_new_tokens == 64 and args.port == 0 and args.requests_per_level is None
    args = bench_mod.parse_args(["--engines", "threadpool", "--concurrency", "1,4", "--url", "http://h:1/"])
    assert args.engines == ["threadpool"] and args.concurrency == [1, 4]
    assert args.url == "http://h:1" and args.label == "server"
    for bad in (["--engines", "vllm"], ["--concurrency", "0"], ["--concurrency", "a"], ["--label", "x"]):
        with pytest.raises(SystemExit):
            bench_mod.parse_args(bad)


async def test_closed_loop_sends_exactly_n_requests_with_c_in_flight(monkeypatch: pytest.MonkeyPatch) -> None:
    in_flight = peak = 0
    statuses = iter([200] * 7 + [503, 500])

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        status = next(statuses)
        return httpx.Response(status, json=_ok_body() if status == 200 else {"detail": "no"})

    def fake_client(base_url: str, concurrency: int, request_timeout_s: float) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=base_url, transport=httpx.MockTransport(handler))

    monkeypatch.setattr(bench_mod, "make_client", fake_client)
    stats = await bench_mod.run_level("http://test", "batched", 3, 9, bench_mod.LoadConfig(8, 5.0), None)
    assert (stats.completed, stats.rejected, stats.failed) == (7, 1, 1)
    assert stats.total_output_tokens == 56 and peak == 3
    assert stats.peak_rss_mib is None


def test_script_entry_point_runs_outside_the_package() -> None:
    script = Path(bench_mod.__file__)
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, cwd="/")
    assert done.returncode == 0 and "--requests-per-level" in done.stdout
