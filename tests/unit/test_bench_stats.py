"""Unit tests for the load benchmark's pure parts: statistics, rendering, /proc parsing, SSE parsing,
request handling."""

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
    fused_note,
    mode_ratio_lines,
    plot_png,
    read_json,
    render_markdown,
    render_markdown_table,
    render_table,
    write_json,
    write_reports,
)
from bench.rss import PeakRssSampler, parse_ppid, parse_vmrss_kib, tree_rss_kib
from bench.sse import SseEvent, SseParser, parse_sse_lines
from bench.stats import (
    LevelStats,
    Mode,
    Outcome,
    RequestResult,
    aggregate,
    engine_ratios,
    inter_token_latency,
    mean,
    mode_ratios,
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


def level(
    engine: str, concurrency: int, throughput: float, p95_ms: float | None, mode: str = "generate", **overrides: Any
) -> LevelStats:
    values: dict[str, Any] = {
        "engine": engine,
        "mode": mode,
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
# Three modes of one engine at C=1 and C=8, plus the baseline engine in generate only.
STREAM_KW: dict[str, Any] = {"p50_client_ttft_ms": 30.0, "p95_client_ttft_ms": 45.0, "p50_itl_ms": 4.5}
MODE_RECORDS = [
    level("batched", 1, 100.0, 200.0),
    level("batched", 1, 95.0, 210.0, mode="stream", p50_e2el_ms=99.0, p95_itl_ms=6.5, **STREAM_KW),
    level("batched", 1, 98.0, 205.0, mode="openai", p50_e2el_ms=91.8, total_output_tokens=448, p50_ttft_ms=None),
    level("batched", 8, 600.0, 300.0),
    level("batched", 8, 540.0, 330.0, mode="stream", **STREAM_KW),
    level("batched", 8, 0.0, 310.0, mode="openai", p50_e2el_ms=None),
    level("threadpool", 1, 50.0, 400.0),
    level("threadpool", 8, 150.0, 1200.0),
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
    assert stats.mode == "generate" and stats.label == "batched/generate"
    assert stats.p50_client_ttft_ms is None and stats.p50_itl_ms is None  # only streamed requests have them


def test_aggregate_client_ttft_and_itl_of_streamed_requests() -> None:
    results = [
        RequestResult(Outcome.COMPLETED, 0.5, 12, 8, 0.01, "m", client_ttft_s=0.10, itl_s=0.020),
        RequestResult(Outcome.COMPLETED, 0.6, 12, 8, 0.02, "m", client_ttft_s=0.30, itl_s=0.040),
        RequestResult(Outcome.COMPLETED, 0.7, 12, 1, 0.03, "m", client_ttft_s=0.20, itl_s=None),  # one token
        RequestResult(Outcome.FAILED, 0.1, error="error event", client_ttft_s=9.0, itl_s=9.0),  # not counted
    ]
    stats = aggregate("batched", 2, results, duration_s=1.0, mode=Mode.STREAM)
    assert stats.mode == "stream" and stats.label == "batched/stream"
    assert stats.p50_client_ttft_ms == pytest.approx(200.0)
    assert stats.p95_client_ttft_ms == pytest.approx(290.0)  # rank 1.9 of [100, 200, 300]
    assert stats.p50_itl_ms == pytest.approx(30.0)
    assert stats.p95_itl_ms == pytest.approx(39.0)  # rank 0.95 of [20, 40]
    assert stats.p50_ttft_ms == pytest.approx(20.0)  # the server-side column is kept


@pytest.mark.parametrize(
    ("first", "last", "tokens", "expected"),
    [
        (0.5, 1.2, 8, 0.1),  # 0.7 s over 7 gaps
        (0.5, 0.5, 2, 0.0),  # both tokens in one event
        (0.5, 0.9, 1, None),  # one token: no gap
        (0.5, 0.9, 0, None),
        (0.9, 0.5, 8, None),  # clock went backwards: not a latency
    ],
)
def test_inter_token_latency(first: float, last: float, tokens: int, expected: float | None) -> None:
    assert inter_token_latency(first, last, tokens) == (None if expected is None else pytest.approx(expected))


def test_aggregate_with_nothing_completed() -> None:
    stats = aggregate("threadpool", 1, [RequestResult(Outcome.FAILED, 1.0, error="x")], duration_s=1.0)
    assert stats.completed == 0 and stats.failed == 1
    assert stats.request_throughput == 0.0 and stats.output_throughput == 0.0
    assert stats.mean_e2el_ms is None and stats.p95_e2el_ms is None and stats.p50_ttft_ms is None
    assert aggregate("x", 1, [], duration_s=0.0).output_throughput == 0.0


# --- ratios -------------------------------------------------------------------------------------------


def test_engine_ratios_compare_generate_rows_only() -> None:
    ratios = engine_ratios(MODE_RECORDS)
    assert [(r.concurrency, r.output_throughput_ratio) for r in ratios] == [(1, 2.0), (8, 4.0)]
    assert [r.concurrency for r in engine_ratios(MODE_RECORDS, mode="stream")] == []  # no threadpool/stream


def test_mode_ratios_per_engine_and_concurrency() -> None:
    overhead = mode_ratios(MODE_RECORDS, "openai")
    assert [(r.engine, r.concurrency, r.numerator, r.denominator) for r in overhead] == [
        ("batched", 1, "openai", "generate"),
        ("batched", 8, "openai", "generate"),
    ]
    assert overhead[0].output_throughput_ratio == pytest.approx(0.98)
    assert overhead[0].p50_e2el_ratio == pytest.approx(1.02)  # 91.8 / 90
    assert overhead[0].numerator_tokens_per_request == pytest.approx(56.0)  # 448 tokens / 8 requests
    assert overhead[0].denominator_tokens_per_request == pytest.approx(64.0)
    assert overhead[1].output_throughput_ratio == 0.0 and overhead[1].p50_e2el_ratio is None
    streaming = mode_ratios(MODE_RECORDS, Mode.STREAM)
    assert [r.output_throughput_ratio for r in streaming] == [pytest.approx(0.95), pytest.approx(0.9)]
    assert streaming[0].p50_e2el_ratio == pytest.approx(1.1)  # 99 / 90
    assert mode_ratios(RECORDS, "openai") == []  # the baseline ran generate only
    zero_generate = [level("batched", 1, 0.0, 1.0, p50_e2el_ms=0.0), level("batched", 1, 5.0, 1.0, mode="stream")]
    assert mode_ratios(zero_generate, "stream")[0].output_throughput_ratio is None
    assert mode_ratios(zero_generate, "stream")[0].p50_e2el_ratio is None


def test_mode_ratio_lines() -> None:
    assert mode_ratio_lines(mode_ratios(MODE_RECORDS, "openai")) == [
        "- batched C=1: openai/generate output throughput 0.98x, p50 latency 1.02x (tokens/request 56.0 vs 64.0)",
        "- batched C=8: openai/generate output throughput 0.00x, p50 latency n/a",
    ]
    assert mode_ratio_lines(mode_ratios(MODE_RECORDS, "stream")) == [
        "- batched C=1: stream/generate output throughput 0.95x, p50 latency 1.10x",
        "- batched C=8: stream/generate output throughput 0.90x, p50 latency 1.00x",
    ]


def test_markdown_mode_sections_and_notes() -> None:
    text = render_markdown(MODE_RECORDS, METADATA)
    assert "## batched vs threadpool (generate)" in text
    assert "- C=8: batched/threadpool output throughput 4.00x, p95 latency 0.25x" in text
    overhead = text.index("## OpenAI path overhead (openai vs generate)")
    streaming = text.index("## Streaming (stream vs generate)")
    assert overhead < text.index("- batched C=1: openai/generate output throughput 0.98x") < streaming
    assert text.index("- batched C=8: stream/generate output throughput 0.90x, p50 latency 1.00x") > streaming
    assert "no `ignore_eos`" in text and "usage.completion_tokens" in text
    assert "first non-empty `token` event" in text
    plain = render_markdown(RECORDS, METADATA)
    assert "OpenAI path overhead" not in plain and "## Streaming" not in plain and "ignore_eos`" not in plain


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
        "| engine/mode | C | completed | failed | rejected | duration_s | req/s | out tok/s | out tokens "
        "| mean e2el ms | p50 e2el ms | p95 e2el ms | p99 e2el ms | p50 srv ttft ms | p95 srv ttft ms "
        "| p50 cli ttft ms | p95 cli ttft ms | p50 itl ms | p95 itl ms | peak RSS MiB | client CPU % | load 1m |"
    )
    assert lines[1].startswith("| :--- | ---: |") and lines[1].count("|") == len(COLUMNS) + 1
    assert len(lines) == 2 + len(RECORDS)
    assert lines[2] == (
        "| batched/generate | 1 | 8 | 0 | 0 | 2.00 | 4.00 | 100.0 | 512 | 100 | 90 | 200 | 150 | 10 | 20 "
        "| - | - | - | - | 512 | - | - |"
    )
    assert lines[5] == (
        "| threadpool/generate | 8 | 8 | 0 | 0 | 2.00 | 4.00 | 150.0 | 512 | 100 | 90 | 1200 | 150 | - | 20 "
        "| - | - | - | - | - | - | - |"
    )
    stream_row = render_markdown_table(MODE_RECORDS).splitlines()[3]
    assert stream_row.startswith("| batched/stream | 1 |")
    assert stream_row.endswith("| 10 | 20 | 30 | 45 | 4.5 | 6.5 | 512 | - | - |")


def test_markdown_document_has_context_and_table() -> None:
    text = render_markdown(RECORDS, METADATA)
    assert text.startswith("# Load benchmark\n")
    assert "- model: tiny-model" in text
    assert "- machine: Test CPU, 4 CPUs" in text
    assert "- max_new_tokens: 64" in text
    assert "| engine/mode | C |" in text


def test_text_table_is_aligned() -> None:
    lines = render_table(RECORDS).splitlines()
    assert lines[0].split()[:3] == ["engine/mode", "C", "completed"]
    assert set(lines[1]) <= {"-", " "}
    assert len(lines) == 2 + len(RECORDS)
    assert lines[2].startswith("batched/generate ") and lines[4].startswith("threadpool/generate ")
    # Numbers are right-aligned: each row ends where the rule does.
    assert lines[2].split()[-3:] == ["512", "-", "-"] and lines[5].endswith("-")
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
    assert raw["results"][0]["mode"] == "generate" and raw["results"][0]["p50_itl_ms"] is None
    write_json(path, MODE_RECORDS, METADATA)
    assert read_json(path)[0] == MODE_RECORDS


def test_results_without_modes_still_load() -> None:
    old = RECORDS[0].to_dict()
    for key in ("mode", "p50_client_ttft_ms", "p95_client_ttft_ms", "p50_itl_ms", "p95_itl_ms"):
        del old[key]
    assert LevelStats.from_dict(old) == RECORDS[0]


def test_png_is_written(tmp_path: Path) -> None:
    path = tmp_path / "chart.png"
    plot_png(path, RECORDS, "title")
    assert path.read_bytes().startswith(PNG_SIGNATURE)


def test_png_has_one_line_per_engine_and_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from matplotlib.axes import Axes

    labels: list[str] = []
    original = Axes.plot

    def spy(self: Axes, *args: Any, **kwargs: Any) -> Any:
        labels.append(kwargs["label"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", spy)
    plot_png(tmp_path / "chart.png", MODE_RECORDS, "title")
    expected = ["batched/generate", "batched/stream", "batched/openai", "threadpool/generate"]
    assert labels == expected * 2  # two panels
    assert (tmp_path / "chart.png").read_bytes().startswith(PNG_SIGNATURE)


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
    assert args.modes == ["generate", "stream", "openai", "json", "chat", "tools"]
    assert args.all_modes_for_baseline is False
    args = bench_mod.parse_args(["--engines", "threadpool", "--concurrency", "1,4", "--url", "http://h:1/"])
    assert args.engines == ["threadpool"] and args.concurrency == [1, 4]
    assert args.url == "http://h:1" and args.label == "server"
    args = bench_mod.parse_args(["--mode", "openai, stream,openai", "--all-modes-for-baseline"])
    assert args.modes == ["openai", "stream"] and args.all_modes_for_baseline is True
    assert bench_mod.parse_args(["--modes", "stream"]).modes == ["stream"]
    bad_args = (
        ["--engines", "vllm"],
        ["--concurrency", "0"],
        ["--concurrency", "a"],
        ["--label", "x"],
        ["--mode", "chats"],
        ["--mode", ","],
    )
    for bad in bad_args:
        with pytest.raises(SystemExit):
            bench_mod.parse_args(bad)


def test_parse_args_for_another_model_workers_and_llama_cpp() -> None:
    args = bench_mod.parse_args([])
    assert args.model is None and args.workers == 1 and args.compare_label == "compare"
    args = bench_mod.parse_args(["--model", "/m/gemma.gguf", "--workers", "2", "--compare-llama-cpp", "/v/python"])
    assert args.model == "/m/gemma.gguf" and args.workers == 2
    assert args.compare_llama_cpp == "/v/python" and args.compare_label == "llama.cpp" and args.compare_threads == 2
    for bad in (
        ["--compare-llama-cpp", "p", "--compare-url", "http://h:1"],
        ["--workers", "0"],
        ["--compare-llama-cpp", "p", "--compare-threads", "0"],
    ):
        with pytest.raises(SystemExit):
            bench_mod.parse_args(bad)


def test_llama_cpp_runs_on_the_models_gguf_file(tmp_path: Path) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    assert bench_mod.gguf_file_of(str(gguf)) == gguf.resolve()
    for not_a_file in (str(tmp_path), str(tmp_path / "missing.gguf"), "HuggingFaceTB/SmolLM2-135M"):
        with pytest.raises(bench_mod.BenchError, match=r"needs --model to be a \.gguf file"):
            bench_mod.gguf_file_of(not_a_file)
    command = bench_mod.llama_cpp_command("/v/python", gguf, "127.0.0.1", 8081, 2)
    assert command[:3] == ["/v/python", "-m", "llama_cpp.server"]
    flags = dict(zip(command[3::2], command[4::2], strict=True))
    assert flags == {"--model": str(gguf), "--n_threads": "2", "--n_threads_batch": "2", "--host": "127.0.0.1",
                     "--port": "8081"}  # fmt: skip


async def test_send_request_adds_the_extra_fields() -> None:
    seen: list[dict[str, Any]] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return httpx.Response(200, json={"choices": [{"text": "Hi"}], "usage": {"completion_tokens": 1}})

    async with _mock_client(handler) as client:
        await bench_mod.send_request(client, "openai", 0, 8, (("min_tokens", 8),))
        await bench_mod.send_request(client, "openai", 1, 8)
    assert seen[0]["min_tokens"] == 8 and seen[0]["max_tokens"] == 8
    assert "min_tokens" not in seen[1]


def test_baseline_engine_runs_generate_only_by_default() -> None:
    modes = ["generate", "stream", "openai"]
    assert bench_mod.modes_for_engine("batched", modes) == modes
    assert bench_mod.modes_for_engine("threadpool", modes) == ["generate"]
    assert bench_mod.modes_for_engine("threadpool", modes, all_modes_for_baseline=True) == modes
    assert bench_mod.modes_for_engine("threadpool", ["stream"]) == []  # the engine is skipped


def test_requests_per_mode() -> None:
    assert bench_mod.build_request("generate", 3, 16) == ("/generate", bench_mod.build_payload(3, 16))
    assert bench_mod.build_request("stream", 3, 16) == ("/generate", bench_mod.build_payload(3, 16) | {"stream": True})
    path, payload = bench_mod.build_request("openai", 3, 16)
    assert path == "/v1/completions"
    assert payload == {
        "model": bench_mod.OPENAI_MODEL,
        "prompt": bench_mod.PROMPTS[3],
        "max_tokens": 16,
        "temperature": 0.8,
        "top_p": 0.95,
        "stream": False,
        "ignore_eos": True,
    }


def _openai_body(completion_tokens: int = 5) -> dict[str, Any]:
    return {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": "tiny",
        "choices": [{"index": 0, "text": "abc", "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 12, "completion_tokens": completion_tokens, "total_tokens": 12 + completion_tokens},
    }


def test_result_from_openai_counts_reported_usage() -> None:
    ok = bench_mod.result_from_openai(200, _openai_body(5), 0.25)
    assert ok == RequestResult(Outcome.COMPLETED, 0.25, prompt_tokens=12, completion_tokens=5, model="tiny")
    assert ok.ttft_s is None and ok.client_ttft_s is None
    error = {"error": {"message": "full", "type": "server_overloaded"}, "request_id": "r"}
    assert bench_mod.result_from_openai(503, error, 0.01).outcome is Outcome.REJECTED
    assert bench_mod.result_from_openai(400, error, 0.01).outcome is Outcome.FAILED
    for malformed in (_ok_body(), {**_openai_body(), "choices": []}, {**_openai_body(), "usage": None}, "text"):
        result = bench_mod.result_from_openai(200, malformed, 0.01)
        assert result.outcome is Outcome.FAILED and "malformed" in (result.error or "")


def test_chat_and_tools_requests_differ_only_by_the_tools() -> None:
    path, chat = bench_mod.build_request("chat", 3, 16)
    assert path == "/v1/chat/completions"
    assert chat["messages"] == [{"role": "user", "content": bench_mod.PROMPTS[3]}]
    assert chat["max_tokens"] == 16 and chat["ignore_eos"] is True and "tools" not in chat
    path, tools = bench_mod.build_request("tools", 3, 16)
    assert path == "/v1/chat/completions"
    assert tools == chat | {"tools": bench_mod.BENCH_TOOLS, "tool_choice": "required"}


def test_result_from_chat_takes_text_or_tool_calls() -> None:
    usage = {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    for message in (
        {"role": "assistant", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
    ):
        body = {"model": "tiny", "choices": [{"index": 0, "message": message}], "usage": usage}
        ok = bench_mod.result_from_chat(200, body, 0.5)
        assert ok == RequestResult(Outcome.COMPLETED, 0.5, prompt_tokens=12, completion_tokens=5, model="tiny")
    empty = {"model": "tiny", "choices": [{"index": 0, "message": {"content": None}}], "usage": usage}
    assert bench_mod.result_from_chat(200, empty, 0.5).outcome is Outcome.FAILED


# --- SSE ----------------------------------------------------------------------------------------------


def test_sse_parser_follows_the_event_stream_rules() -> None:
    lines = [
        ": ping - 2025-01-01 00:00:00",  # comment
        "event: token",
        'data: {"text": "a"}',
        "",
        "",  # a second blank line dispatches nothing
        "event:token",  # no space after the colon
        "data:  two spaces",  # only the first space is dropped
        "id: 7",  # unknown to the parser: ignored
        "",
        "data: first",  # no event field: "message"
        "data: second",
        "",
        "event: lonely",  # no data: not dispatched, and the type does not leak into the next event
        "",
        "data",  # a field name without a colon: empty data
        "",
        "event: done",
        "data: {}",  # the stream ends without a blank line
    ]
    assert parse_sse_lines(lines) == [
        SseEvent("token", '{"text": "a"}'),
        SseEvent("token", " two spaces"),
        SseEvent("message", "first\nsecond"),
        SseEvent("message", ""),
        SseEvent("done", "{}"),
    ]


def test_sse_parser_strips_line_endings_and_flushes_once() -> None:
    parser = SseParser()
    assert parser.feed("event: done\r\n") is None
    assert parser.feed("data: [DONE]\n") is None
    assert parser.feed("\r\n") == SseEvent("done", "[DONE]")
    assert parser.flush() is None
    assert parse_sse_lines([]) == []


def _sse(*events: tuple[str, Any]) -> bytes:
    """An sse-starlette-like body: CRLF line endings, a ping comment first."""
    parts = [": ping\r\n\r\n"]
    parts += [f"event: {name}\r\ndata: {json.dumps(data)}\r\n\r\n" for name, data in events]
    return "".join(parts).encode()


def _at(events: list[tuple[str, Any]], times: list[float]) -> list[tuple[float, SseEvent]]:
    return [(t, SseEvent(name, json.dumps(data))) for t, (name, data) in zip(times, events, strict=True)]


def test_result_from_stream_measures_client_ttft_and_itl() -> None:
    events = [
        ("token", {"text": ""}),  # empty text is not a first token
        ("token", {"text": "Once upon"}),
        ("token", {"text": " a"}),
        ("token", {"text": ""}),
        ("token", {"text": " time"}),
        ("done", _ok_body(completion_tokens=8, ttft=0.05)),
        ("token", {"text": "ignored after done"}),
    ]
    result = bench_mod.result_from_stream(_at(events, [0.1, 0.3, 0.5, 0.6, 1.0, 1.1, 1.2]), 1.25)
    assert result.outcome is Outcome.COMPLETED and result.latency_s == 1.25
    assert (result.prompt_tokens, result.completion_tokens, result.ttft_s, result.model) == (12, 8, 0.05, "tiny")
    assert result.client_ttft_s == pytest.approx(0.3)
    assert result.itl_s == pytest.approx(0.1)  # (1.0 - 0.3) / (8 - 1)


def test_result_from_stream_without_text_or_with_one_token() -> None:
    no_text = bench_mod.result_from_stream(_at([("done", _ok_body(completion_tokens=0))], [0.2]), 0.2)
    assert no_text.outcome is Outcome.COMPLETED and no_text.client_ttft_s is None and no_text.itl_s is None
    one = [("token", {"text": "x"}), ("done", _ok_body(completion_tokens=1))]
    single = bench_mod.result_from_stream(_at(one, [0.2, 0.3]), 0.3)
    assert single.client_ttft_s == pytest.approx(0.2) and single.itl_s is None


def test_result_from_stream_failures() -> None:
    error = [("token", {"text": "x"}), ("error", {"detail": "deadline", "status": 504, "request_id": "r"})]
    failed = bench_mod.result_from_stream(_at(error, [0.1, 0.2]), 0.2)
    assert failed.outcome is Outcome.FAILED and "deadline" in (failed.error or "")
    cut = bench_mod.result_from_stream(_at([("token", {"text": "x"})], [0.1]), 0.2)
    assert cut.outcome is Outcome.FAILED and "without a done event" in (cut.error or "")
    malformed_token = bench_mod.result_from_stream([(0.1, SseEvent("token", "not json"))], 0.2)
    assert malformed_token.outcome is Outcome.FAILED and "malformed token" in (malformed_token.error or "")
    assert bench_mod.result_from_stream([(0.1, SseEvent("token", "[]"))], 0.2).outcome is Outcome.FAILED
    malformed_done = bench_mod.result_from_stream([(0.1, SseEvent("done", '{"generated_text": "x"}'))], 0.2)
    assert malformed_done.outcome is Outcome.FAILED and "malformed" in (malformed_done.error or "")
    assert bench_mod.result_from_stream([(0.1, SseEvent("done", "oops"))], 0.2).outcome is Outcome.FAILED


def _mock_client(handler: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url="http://test", transport=httpx.MockTransport(handler))


async def test_send_request_streams_over_http() -> None:
    seen: list[dict[str, Any]] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        body = _sse(("token", {"text": "Hi"}), ("token", {"text": " there"}), ("done", _ok_body(completion_tokens=2)))
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    async with _mock_client(handler) as client:
        result = await bench_mod.send_request(client, "stream", 0, 2)
    assert seen[0]["stream"] is True and seen[0]["ignore_eos"] is True
    assert result.outcome is Outcome.COMPLETED and result.completion_tokens == 2
    assert result.client_ttft_s is not None and 0 <= result.client_ttft_s <= result.latency_s
    assert result.itl_s is not None and result.itl_s >= 0


async def test_send_request_stream_rejected_or_cut() -> None:
    responses = iter(
        [
            httpx.Response(503, json={"detail": "full", "request_id": "r"}),
            httpx.Response(200, content=_sse(("token", {"text": "x"}))),
        ]
    )

    async def handler(request: httpx.Request) -> httpx.Response:
        return next(responses)

    async with _mock_client(handler) as client:
        rejected = await bench_mod.send_request(client, "stream", 0, 2)
        cut = await bench_mod.send_request(client, "stream", 1, 2)
    assert rejected.outcome is Outcome.REJECTED
    assert cut.outcome is Outcome.FAILED and "without a done event" in (cut.error or "")


async def test_closed_loop_sends_exactly_n_requests_with_c_in_flight(monkeypatch: pytest.MonkeyPatch) -> None:
    in_flight = peak = 0
    statuses = iter([200] * 7 + [503, 500])

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)  # the fake server's service time, so requests overlap: not a wait in the test
        in_flight -= 1
        status = next(statuses)
        return httpx.Response(status, json=_ok_body() if status == 200 else {"detail": "no"})

    def fake_client(base_url: str, concurrency: int, request_timeout_s: float) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=base_url, transport=httpx.MockTransport(handler))

    monkeypatch.setattr(bench_mod, "make_client", fake_client)
    stats = await bench_mod.run_level("http://test", "batched", "generate", 3, 9, bench_mod.LoadConfig(8, 5.0), None)
    assert (stats.completed, stats.rejected, stats.failed) == (7, 1, 1)
    assert stats.total_output_tokens == 56 and peak == 3
    assert stats.peak_rss_mib is None and stats.label == "batched/generate"


@pytest.mark.parametrize("mode", ["stream", "openai"])
async def test_run_level_in_each_mode(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    paths: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.path)
        if request.url.path == "/v1/completions":
            return httpx.Response(200, json=_openai_body(completion_tokens=5))
        body = _sse(("token", {"text": "ab"}), ("token", {"text": "cd"}), ("done", _ok_body(completion_tokens=8)))
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    monkeypatch.setattr(bench_mod, "make_client", lambda base_url, *_: _mock_client(handler))
    stats = await bench_mod.run_level("http://test", "batched", mode, 2, 5, bench_mod.LoadConfig(8, 5.0), None)
    assert stats.label == f"batched/{mode}" and stats.completed == 5 and stats.failed == 0
    if mode == "stream":
        assert paths == ["/generate"] * 5 and stats.total_output_tokens == 40
        assert stats.p50_client_ttft_ms is not None and stats.p95_itl_ms is not None
    else:
        assert paths == ["/v1/completions"] * 5 and stats.total_output_tokens == 25
        assert stats.p50_client_ttft_ms is None and stats.p50_ttft_ms is None


async def test_run_levels_interleaves_modes_per_concurrency(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, int]] = []

    async def fake_warm_up(base_url: str, config: Any, label: str, modes: Any) -> set[str]:
        calls.append(("warm-up " + ",".join(modes), 0))
        return {"tiny"}

    async def fake_level(base_url: str, engine: str, mode: str, concurrency: int, *rest: Any) -> LevelStats:
        calls.append((mode, concurrency))
        return level(engine, concurrency, 1.0, 1.0, mode=mode)

    monkeypatch.setattr(bench_mod, "warm_up", fake_warm_up)
    monkeypatch.setattr(bench_mod, "run_level", fake_level)
    args = bench_mod.parse_args(["--concurrency", "1,4", "--mode", "generate,openai"])
    run = bench_mod.EngineRun()
    await bench_mod.run_levels("http://t", "batched", args.modes, args, bench_mod.LoadConfig(8, 5.0), None, run)
    assert calls == [("warm-up generate,openai", 0), ("generate", 1), ("openai", 1), ("generate", 4), ("openai", 4)]
    assert [r.label for r in run.records] == ["batched/generate", "batched/openai"] * 2 and run.models == {"tiny"}


def test_script_entry_point_runs_outside_the_package() -> None:
    script = Path(bench_mod.__file__)
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, cwd="/")
    assert done.returncode == 0 and "--requests-per-level" in done.stdout


def test_the_bench_header_shows_a_fused_kernel_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    """A refused kernel folder costs ~25% throughput: the results say so, with the server's reason."""
    reason = "off: kernel folder /x is owned by uid 65534, not by this user (uid 0); fix: ..."
    answers = {
        "/metrics": httpx.Response(200, text='textgen_model_info{core="textgen-llama",weights="int4"} 1\n'),
        "/ready": httpx.Response(200, json={"status": "ready", "details": {"fused_kernels": reason}}),
    }
    monkeypatch.setattr(bench_mod.httpx, "get", lambda url, **_: answers[httpx.URL(url).path])
    info = bench_mod.server_core_info("http://server")
    assert info == {"core": "textgen-llama", "weights": "int4", "fused kernels": reason}
    assert f"- batched: core textgen-llama, weights int4, fused kernels {reason}" in render_markdown(
        RECORDS, {**METADATA, "servers": {"batched": info}}
    )
    assert fused_note({"fused_kernels": False, "fused_kernels_off": "no C compiler found"}) == (
        "fused kernels off (no C compiler found)"
    )
    assert fused_note({"fused_kernels": True}) == "fused kernels on"


def test_speculative_bench_rounds_include_the_compare_server() -> None:
    """bench.speculative --compare-url: the other server answers in every round, and the row gives the setting
    under test against it beside on / off (tokens over each server's own wall time)."""
    from bench import speculative

    served: dict[str, int] = {}

    def answering(label: str, tokens: int) -> httpx.AsyncClient:
        def handler(request: httpx.Request) -> httpx.Response:
            served[label] = served.get(label, 0) + 1
            body = {"usage": {"completion_tokens": tokens}, "choices": [{"message": {"content": "same"}}]}
            return httpx.Response(200, json=body)

        return httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://test")

    clients = {"off": answering("off", 10), "on": answering("on", 30), speculative.COMPARE: answering("c", 20)}
    row = asyncio.run(speculative.measure(clients, "repeat", concurrency=2, requests=4))
    assert served == {"off": 4, "on": 4, "c": 4}
    assert row["completion_tokens"] == {"off": 40, "on": 120, speculative.COMPARE: 80}
    assert row["ratio_vs_compare"] is not None and row["ratio_vs_compare"] > 0
    assert row["greedy_differences"] == 0
    without = asyncio.run(speculative.measure({k: clients[k] for k in ("off", "on")}, "open", 1, 2))
    assert without["ratio_vs_compare"] is None
