"""Rendering of benchmark results: a plain-text table, markdown, JSON and a PNG chart."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.stats import EngineRatio, LevelStats, Mode, ModeRatio, cross_ratios, engine_ratios, mode_ratios

JSON_NAME = "results.json"
MARKDOWN_NAME = "results.md"
PNG_NAME = "results.png"


def _fmt_int(value: Any) -> str:
    return "-" if value is None else str(int(value))


def _fmt_float(digits: int) -> Callable[[Any], str]:
    def fmt(value: Any) -> str:
        return "-" if value is None else f"{float(value):.{digits}f}"

    return fmt


def _fmt_str(value: Any) -> str:
    return "-" if value is None else str(value)


@dataclass(frozen=True, slots=True)
class Column:
    key: str
    header: str
    fmt: Callable[[Any], str]
    numeric: bool = True


COLUMNS: tuple[Column, ...] = (
    Column("label", "engine/mode", _fmt_str, numeric=False),
    Column("concurrency", "C", _fmt_int),
    Column("completed", "completed", _fmt_int),
    Column("failed", "failed", _fmt_int),
    Column("rejected", "rejected", _fmt_int),
    Column("duration_s", "duration_s", _fmt_float(2)),
    Column("request_throughput", "req/s", _fmt_float(2)),
    Column("output_throughput", "out tok/s", _fmt_float(1)),
    Column("total_output_tokens", "out tokens", _fmt_int),
    Column("mean_e2el_ms", "mean e2el ms", _fmt_float(0)),
    Column("p50_e2el_ms", "p50 e2el ms", _fmt_float(0)),
    Column("p95_e2el_ms", "p95 e2el ms", _fmt_float(0)),
    Column("p99_e2el_ms", "p99 e2el ms", _fmt_float(0)),
    Column("p50_ttft_ms", "p50 srv ttft ms", _fmt_float(0)),
    Column("p95_ttft_ms", "p95 srv ttft ms", _fmt_float(0)),
    Column("p50_client_ttft_ms", "p50 cli ttft ms", _fmt_float(0)),
    Column("p95_client_ttft_ms", "p95 cli ttft ms", _fmt_float(0)),
    Column("p50_itl_ms", "p50 itl ms", _fmt_float(1)),
    Column("p95_itl_ms", "p95 itl ms", _fmt_float(1)),
    Column("peak_rss_mib", "peak RSS MiB", _fmt_float(0)),
    Column("client_cpu_pct", "client CPU %", _fmt_float(0)),
    Column("load_avg_1m", "load 1m", _fmt_float(2)),
)


def table_cells(records: Iterable[LevelStats]) -> list[list[str]]:
    """Formatted cells, one row per level, in ``COLUMNS`` order (keys are fields or properties)."""
    return [[col.fmt(getattr(record, col.key)) for col in COLUMNS] for record in records]


def render_table(records: Sequence[LevelStats]) -> str:
    """A fixed-width text table for a terminal: text left-aligned, numbers right-aligned."""
    headers = [col.header for col in COLUMNS]
    rows = table_cells(records)
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        parts = [
            cell.rjust(width) if col.numeric else cell.ljust(width)
            for cell, width, col in zip(cells, widths, COLUMNS, strict=True)
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(headers), rule, *(line(row) for row in rows)])


def render_markdown_table(records: Sequence[LevelStats]) -> str:
    header = "| " + " | ".join(col.header for col in COLUMNS) + " |"
    align = "| " + " | ".join("---:" if col.numeric else ":---" for col in COLUMNS) + " |"
    rows = ["| " + " | ".join(row) + " |" for row in table_cells(records)]
    return "\n".join([header, align, *rows])


def _fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def ratio_lines(ratios: Iterable[EngineRatio]) -> list[str]:
    """One markdown bullet per concurrency comparing two engines."""
    return [
        f"- C={r.concurrency}: {r.numerator}/{r.denominator} output throughput "
        f"{_fmt_ratio(r.output_throughput_ratio)}, p95 latency {_fmt_ratio(r.p95_e2el_ratio)}"
        for r in ratios
    ]


def _tokens_note(r: ModeRatio) -> str:
    """Mean tokens per request of both modes when they differ (a shorter output is a cheaper request)."""
    top, bottom = r.numerator_tokens_per_request, r.denominator_tokens_per_request
    if top is None or bottom is None or abs(top - bottom) < 0.05:
        return ""
    return f" (tokens/request {top:.1f} vs {bottom:.1f})"


def mode_ratio_lines(ratios: Iterable[ModeRatio]) -> list[str]:
    """One markdown bullet per engine and concurrency comparing two modes of that engine."""
    return [
        f"- {r.engine} C={r.concurrency}: {r.numerator}/{r.denominator} output throughput "
        f"{_fmt_ratio(r.output_throughput_ratio)}, p50 latency {_fmt_ratio(r.p50_e2el_ratio)}{_tokens_note(r)}"
        for r in ratios
    ]


def machine_label(metadata: Mapping[str, Any]) -> str:
    machine = metadata.get("machine") or {}
    cpu = machine.get("cpu_model") or machine.get("processor") or "unknown CPU"
    label = f"{cpu}, {machine.get('cpu_count', '?')} CPUs"
    gpus = machine.get("gpus") or []
    return f"{label}, {', '.join(gpus)}" if gpus else label


def mode_notes(modes: Iterable[str]) -> list[str]:
    """Context bullets for the modes present in the results."""
    present = set(modes)
    notes = []
    if Mode.STREAM in present:
        notes.append(
            "- stream rows (`/generate` with `stream: true`): cli ttft is client-side, from sending the request "
            "to the first non-empty `token` event (it includes the content filter's short holdback of text); "
            "itl is (last token event - first token event) / (completion_tokens - 1) per request; "
            "e2el runs to the end of the stream"
        )
    if Mode.JSON in present:
        notes.append(
            "- json rows (`/generate` with a small `json_schema`, see bench/mask_cost.py): every row is "
            "constrained; a row ends (`stop`) when its JSON record is complete, so outputs may be shorter "
            "than max_new_tokens; throughput counts the tokens generated"
        )
    if Mode.TOOLS in present:
        notes.append(
            '- tools rows (`/v1/chat/completions` with two functions and `tool_choice: "required"`, '
            "`ignore_eos`): every token is held to the tool-call grammar; an answer also ends when it holds the "
            "most parallel calls allowed, so outputs may be shorter; compare with the chat rows (same prompts)"
        )
    if Mode.OPENAI in present:
        notes.append(
            "- openai rows (`/v1/completions`, max_tokens = max_new_tokens): that API has no `ignore_eos`, so "
            "outputs may stop early and lengths vary; throughput counts the `usage.completion_tokens` it reports"
        )
    return notes


def render_markdown(records: Sequence[LevelStats], metadata: Mapping[str, Any]) -> str:
    """The results.md document: context lines, the table, engine ratios when both engines ran and mode
    ratios (OpenAI path overhead, streaming) when an engine ran several modes."""
    args = metadata.get("args") or {}
    lines = [
        "# Load benchmark",
        "",
        f"- date: {metadata.get('date', '?')}",
        f"- model: {metadata.get('model') or '?'}",
        f"- machine: {machine_label(metadata)}",
        f"- max_new_tokens: {args.get('max_new_tokens', '?')} (ignore_eos, temperature 0.8, top_p 0.95)",
        "- rows are engine/mode; latencies are client-side wall time per request (e2el) and server-side time "
        "to first token (srv ttft, from the response's timings)",
        *mode_notes(r.mode for r in records),
        "",
        render_markdown_table(records),
    ]
    lines += header_notes(metadata)
    lines += core_rate_section(records, metadata.get("core_rates") or {})
    compare = metadata.get("compare_label")
    if compare:
        for ours in (Mode.GENERATE.value, Mode.OPENAI.value):
            versus = cross_ratios(records, ("batched", ours), (compare, Mode.OPENAI.value))
            if versus:
                lines += ["", f"## batched/{ours} vs {compare}/{Mode.OPENAI} (same run)", "", *ratio_lines(versus)]
    ratios = engine_ratios(records)
    if ratios:
        title = f"## {ratios[0].numerator} vs {ratios[0].denominator} ({Mode.GENERATE})"
        lines += ["", title, "", *ratio_lines(ratios)]
    overhead = mode_ratios(records, Mode.OPENAI)
    if overhead:
        lines += ["", f"## OpenAI path overhead ({Mode.OPENAI} vs {Mode.GENERATE})", "", *mode_ratio_lines(overhead)]
    streaming = mode_ratios(records, Mode.STREAM)
    if streaming:
        lines += ["", f"## Streaming ({Mode.STREAM} vs {Mode.GENERATE})", "", *mode_ratio_lines(streaming)]
    tools = mode_ratios(records, Mode.TOOLS, Mode.CHAT)
    if tools:
        lines += ["", f"## Tool calls ({Mode.TOOLS} vs {Mode.CHAT}, same run)", "", *mode_ratio_lines(tools)]
    structured = mode_ratios(records, Mode.JSON)
    if structured:
        lines += ["", f"## Structured output ({Mode.JSON} vs {Mode.GENERATE})", "", *mode_ratio_lines(structured)]
    mask_cost = metadata.get("mask_cost") or []
    if mask_cost:
        lines += ["", "Token-mask cost per decode step (bench/mask_cost.py, in-process, same function as the engine):"]
        lines += ["", *mask_cost_lines(mask_cost)]
    return "\n".join(lines) + "\n"


def header_notes(metadata: Mapping[str, Any]) -> list[str]:
    """Load average around the run and what each server computed with (from its /metrics)."""
    notes = []
    load = metadata.get("load_avg_at_start")
    if load:
        notes.append(f"- load average at start (1/5/15 min): {' / '.join(f'{v:.2f}' for v in load)}")
    for label, info in (metadata.get("servers") or {}).items():
        notes.append(f"- {label}: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    return ["", *notes] if notes else []


def fused_note(core: Mapping[str, Any]) -> str:
    """fused.c on or off (and why) in a core's description: a refused kernel folder costs ~25% throughput."""
    if "fused_kernels" not in core:
        return "fused kernels n/a"
    return "fused kernels on" if core["fused_kernels"] else f"fused kernels off ({core.get('fused_kernels_off', '?')})"


def core_rate_section(records: Sequence[LevelStats], core_rates: Mapping[str, Any]) -> list[str]:
    """The core's decode rate measured alone (``bench.core_rate``) next to the server's figure at the same C."""
    lines = []
    for label, rates in core_rates.items():
        by_batch = {int(row["batch"]): row for row in rates.get("rows", [])}
        served = {r.concurrency: r for r in records if r.engine == label and r.mode == Mode.GENERATE}
        rows = []
        for c, record in sorted(served.items()):
            row = by_batch.get(c)
            if row is None:
                continue
            share = record.output_throughput / row["tokens_per_s"] if row["tokens_per_s"] else None
            rows.append(
                f"| {c} | {row['steps_per_s']:.1f} | {row['tokens_per_s']:.0f} | {record.output_throughput:.0f} "
                f"| {_fmt_ratio(share)} |"
            )
        if rows:
            lines += [
                "",
                f"## {label}: the core alone vs the server (generate)",
                "",
                f"Core: {rates.get('core', {}).get('weights', '?')}; {fused_note(rates.get('core', {}))}; "
                "measured by `python -m bench.core_rate` "
                "before the server started (decode steps only, no prefill, sampling or HTTP).",
                "",
                "| C | core steps/s | core tok/s | server out tok/s | server / core |",
                "| ---: | ---: | ---: | ---: | ---: |",
                *rows,
            ]
    return lines


def mask_cost_lines(results: Iterable[Mapping[str, Any]]) -> list[str]:
    return [
        f"- {int(r['rows'])} constrained rows: {r['mean_ms']:.2f} ms mean, {r['p95_ms']:.2f} ms p95 per step "
        f"(vocabulary {int(r['vocab'])})"
        for r in results
    ]


def results_document(records: Sequence[LevelStats], metadata: Mapping[str, Any]) -> dict[str, Any]:
    return {"metadata": dict(metadata), "results": [record.to_dict() for record in records]}


def write_json(path: Path, records: Sequence[LevelStats], metadata: Mapping[str, Any]) -> None:
    text = json.dumps(results_document(records, metadata), indent=2, allow_nan=False, default=str)
    path.write_text(text + "\n", encoding="utf-8")


def read_json(path: Path) -> tuple[list[LevelStats], dict[str, Any]]:
    data = json.loads(path.read_text(encoding="utf-8"))
    return [LevelStats.from_dict(item) for item in data["results"]], data["metadata"]


def _series(records: Iterable[LevelStats], label: str, key: str) -> tuple[list[int], list[float]]:
    points = sorted((r.concurrency, getattr(r, key)) for r in records if r.label == label)
    kept = [(c, v) for c, v in points if v is not None]
    return [c for c, _ in kept], [v for _, v in kept]


def plot_png(path: Path, records: Sequence[LevelStats], title: str) -> None:
    """Two panels, output tok/s and p95 latency against concurrency (log2 axis), one line per engine/mode."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import ScalarFormatter

    fig = Figure(figsize=(11, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    panels = (
        ("output_throughput", "output throughput (tok/s)"),
        ("p95_e2el_ms", "p95 end-to-end latency (ms)"),
    )
    labels = list(dict.fromkeys(r.label for r in records))
    concurrencies = sorted({r.concurrency for r in records})
    for ax, (key, ylabel) in zip(fig.subplots(1, 2), panels, strict=True):
        for label in labels:
            xs, ys = _series(records, label, key)
            ax.plot(xs, ys, marker="o", label=label)
        ax.set_xscale("log", base=2)
        if concurrencies:
            ax.set_xticks(concurrencies)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.set_xlabel("concurrency (closed-loop clients)")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        if labels:
            ax.legend()
    fig.suptitle(title)
    fig.savefig(path, format="png", dpi=120)


def plot_title(metadata: Mapping[str, Any]) -> str:
    return f"textgen load test: {metadata.get('model') or 'unknown model'} on {machine_label(metadata)}"


def write_reports(out_dir: Path, records: Sequence[LevelStats], metadata: Mapping[str, Any]) -> list[Path]:
    """Write results.json, results.md and results.png into ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path, png_path = out_dir / JSON_NAME, out_dir / MARKDOWN_NAME, out_dir / PNG_NAME
    write_json(json_path, records, metadata)
    md_path.write_text(render_markdown(records, metadata), encoding="utf-8")
    plot_png(png_path, records, plot_title(metadata))
    return [json_path, md_path, png_path]
