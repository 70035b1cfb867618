"""Pure statistics of a load-test level: percentiles, per-level aggregation, streaming latencies and
engine / mode ratios.

Metric names follow ``vllm bench serve`` (``request_throughput``, ``output_throughput``, ``mean_e2el_ms``,
``p95_ttft_ms``, ``p95_itl_ms``, ...) so results can be read side by side with vLLM's. ``*_ttft_ms`` is the
server's own time to first token (from the response's ``timings``); ``*_client_ttft_ms`` and ``*_itl_ms``
are measured by the client on the streaming endpoint.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from enum import StrEnum
from typing import Any


class Mode(StrEnum):
    """Which endpoint a level drives."""

    GENERATE = "generate"  # POST /generate, one JSON answer
    STREAM = "stream"  # POST /generate with stream: true, Server-Sent Events
    OPENAI = "openai"  # POST /v1/completions, one JSON answer
    JSON = "json"  # POST /generate with a small json_schema (structured output)
    CHAT = "chat"  # POST /v1/chat/completions, plain chat
    TOOLS = "tools"  # POST /v1/chat/completions with tools and tool_choice "required" (calls held to a grammar)


class Outcome(StrEnum):
    """How one benchmark request ended."""

    COMPLETED = "completed"  # HTTP 200 with a well-formed body
    REJECTED = "rejected"  # HTTP 503: the server's queue was full
    FAILED = "failed"  # anything else: other status, malformed body, transport error, timeout


@dataclass(frozen=True, slots=True)
class RequestResult:
    """One request as the client saw it; latency is client-side wall time."""

    outcome: Outcome
    latency_s: float
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float | None = None  # server-side, from the response's ``timings.time_to_first_token_s``
    model: str | None = None
    error: str | None = None
    client_ttft_s: float | None = None  # streaming only: request sent -> first non-empty token event
    itl_s: float | None = None  # streaming only: see ``inter_token_latency``


@dataclass(frozen=True, slots=True, kw_only=True)
class LevelStats:
    """Aggregated metrics of one (engine, mode, concurrency) level. Latencies are in milliseconds."""

    engine: str
    mode: str = Mode.GENERATE.value
    concurrency: int
    completed: int
    failed: int
    rejected: int
    duration_s: float
    request_throughput: float
    output_throughput: float
    total_input_tokens: int
    total_output_tokens: int
    mean_e2el_ms: float | None
    p50_e2el_ms: float | None
    p95_e2el_ms: float | None
    p99_e2el_ms: float | None
    p50_ttft_ms: float | None
    p95_ttft_ms: float | None
    p50_client_ttft_ms: float | None = None
    p95_client_ttft_ms: float | None = None
    p50_itl_ms: float | None = None
    p95_itl_ms: float | None = None
    peak_rss_mib: float | None
    client_cpu_pct: float | None = None  # the load generator's own CPU use during the level (100 = one core)
    load_avg_1m: float | None = None  # the machine's 1-minute load average when the level started

    @property
    def label(self) -> str:
        """``engine/mode``, e.g. ``batched/stream``: the row and line name in tables and charts."""
        return f"{self.engine}/{self.mode}"

    @property
    def tokens_per_request(self) -> float | None:
        return self.total_output_tokens / self.completed if self.completed else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LevelStats:
        """Fields missing from older results (``mode``, client-side latencies) take their defaults."""
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


@dataclass(frozen=True, slots=True)
class EngineRatio:
    """``numerator / denominator`` engine ratios at one concurrency (same mode); None where undefined."""

    concurrency: int
    numerator: str
    denominator: str
    output_throughput_ratio: float | None
    p95_e2el_ratio: float | None


@dataclass(frozen=True, slots=True)
class ModeRatio:
    """``numerator / denominator`` mode ratios of one engine at one concurrency; None where undefined."""

    engine: str
    concurrency: int
    numerator: str
    denominator: str
    output_throughput_ratio: float | None
    p50_e2el_ratio: float | None
    numerator_tokens_per_request: float | None
    denominator_tokens_per_request: float | None


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between closest ranks (numpy's default).

    Returns None for an empty sequence.
    """
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be within [0, 100], got {q}")
    if not values:
        return None
    ordered = sorted(values)
    rank = q / 100.0 * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


def _count(results: Iterable[RequestResult], outcome: Outcome) -> int:
    return sum(1 for r in results if r.outcome is outcome)


def inter_token_latency(first_token_s: float, last_token_s: float, completion_tokens: int) -> float | None:
    """Mean time between tokens of one streamed request: the span from the first to the last token event
    over ``completion_tokens - 1`` gaps. None for fewer than two tokens or a negative span.

    Events may carry several tokens (the server's content filter holds back a short tail of text, so the
    first event usually carries a few), so this is an average over the stream rather than a per-event gap,
    and it reads low when the first event's tokens are a large share of a short output.
    """
    if completion_tokens < 2 or last_token_s < first_token_s:
        return None
    return (last_token_s - first_token_s) / (completion_tokens - 1)


def aggregate(
    engine: str,
    concurrency: int,
    results: Sequence[RequestResult],
    duration_s: float,
    peak_rss_mib: float | None = None,
    mode: str = Mode.GENERATE.value,
    client_cpu_pct: float | None = None,
    load_avg_1m: float | None = None,
) -> LevelStats:
    """Aggregate one level. Latency and token statistics cover completed requests only, as vLLM's do."""
    done = [r for r in results if r.outcome is Outcome.COMPLETED]
    latencies = [r.latency_s for r in done]
    ttfts = [r.ttft_s for r in done if r.ttft_s is not None]
    client_ttfts = [r.client_ttft_s for r in done if r.client_ttft_s is not None]
    itls = [r.itl_s for r in done if r.itl_s is not None]
    output_tokens = sum(r.completion_tokens for r in done)
    per_second = 1.0 / duration_s if duration_s > 0 else 0.0
    return LevelStats(
        engine=engine,
        mode=str(mode),
        concurrency=concurrency,
        completed=len(done),
        failed=_count(results, Outcome.FAILED),
        rejected=_count(results, Outcome.REJECTED),
        duration_s=duration_s,
        request_throughput=len(done) * per_second,
        output_throughput=output_tokens * per_second,
        total_input_tokens=sum(r.prompt_tokens for r in done),
        total_output_tokens=output_tokens,
        mean_e2el_ms=_ms(mean(latencies)),
        p50_e2el_ms=_ms(percentile(latencies, 50)),
        p95_e2el_ms=_ms(percentile(latencies, 95)),
        p99_e2el_ms=_ms(percentile(latencies, 99)),
        p50_ttft_ms=_ms(percentile(ttfts, 50)),
        p95_ttft_ms=_ms(percentile(ttfts, 95)),
        p50_client_ttft_ms=_ms(percentile(client_ttfts, 50)),
        p95_client_ttft_ms=_ms(percentile(client_ttfts, 95)),
        p50_itl_ms=_ms(percentile(itls, 50)),
        p95_itl_ms=_ms(percentile(itls, 95)),
        peak_rss_mib=peak_rss_mib,
        client_cpu_pct=client_cpu_pct,
        load_avg_1m=load_avg_1m,
    )


def safe_ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def cross_ratios(
    records: Iterable[LevelStats], numerator: tuple[str, str], denominator: tuple[str, str]
) -> list[EngineRatio]:
    """``(engine, mode)`` over ``(engine, mode)`` at every concurrency both ran, sorted by concurrency."""
    by_key = {(r.engine, r.mode, r.concurrency): r for r in records}
    shared = sorted(
        {c for e, m, c in by_key if (e, m) == numerator} & {c for e, m, c in by_key if (e, m) == denominator}
    )
    return [
        EngineRatio(
            concurrency=c,
            numerator="/".join(numerator),
            denominator="/".join(denominator),
            output_throughput_ratio=safe_ratio(
                by_key[(*numerator, c)].output_throughput, by_key[(*denominator, c)].output_throughput
            ),
            p95_e2el_ratio=safe_ratio(by_key[(*numerator, c)].p95_e2el_ms, by_key[(*denominator, c)].p95_e2el_ms),
        )
        for c in shared
    ]


def engine_ratios(
    records: Iterable[LevelStats],
    numerator: str = "batched",
    denominator: str = "threadpool",
    mode: str = Mode.GENERATE.value,
) -> list[EngineRatio]:
    """Per-concurrency ratios for every concurrency both engines ran in ``mode``, sorted by concurrency."""
    by_key = {(r.engine, r.concurrency): r for r in records if r.mode == mode}
    shared = sorted({c for e, c in by_key if e == numerator} & {c for e, c in by_key if e == denominator})
    ratios = []
    for c in shared:
        top, bottom = by_key[(numerator, c)], by_key[(denominator, c)]
        ratios.append(
            EngineRatio(
                concurrency=c,
                numerator=numerator,
                denominator=denominator,
                output_throughput_ratio=safe_ratio(top.output_throughput, bottom.output_throughput),
                p95_e2el_ratio=safe_ratio(top.p95_e2el_ms, bottom.p95_e2el_ms),
            )
        )
    return ratios


def mode_ratios(
    records: Iterable[LevelStats], numerator: str, denominator: str = Mode.GENERATE.value
) -> list[ModeRatio]:
    """``numerator``-mode over ``denominator``-mode ratios for every (engine, concurrency) that ran both,
    engines in first-seen order, then by concurrency."""
    levels = list(records)
    by_key = {(r.engine, r.mode, r.concurrency): r for r in levels}
    engines = list(dict.fromkeys(r.engine for r in levels))
    ratios = []
    for engine in engines:
        shared = sorted(
            {c for e, m, c in by_key if e == engine and m == numerator}
            & {c for e, m, c in by_key if e == engine and m == denominator}
        )
        for c in shared:
            top, bottom = by_key[(engine, numerator, c)], by_key[(engine, denominator, c)]
            ratios.append(
                ModeRatio(
                    engine=engine,
                    concurrency=c,
                    numerator=numerator,
                    denominator=denominator,
                    output_throughput_ratio=safe_ratio(top.output_throughput, bottom.output_throughput),
                    p50_e2el_ratio=safe_ratio(top.p50_e2el_ms, bottom.p50_e2el_ms),
                    numerator_tokens_per_request=top.tokens_per_request,
                    denominator_tokens_per_request=bottom.tokens_per_request,
                )
            )
    return ratios
