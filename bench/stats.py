"""Pure statistics of a load-test level: percentiles, per-level aggregation and engine ratios.

Metric names follow ``vllm bench serve`` (``request_throughput``, ``output_throughput``, ``mean_e2el_ms``,
``p95_ttft_ms``, ...) so results can be read side by side with vLLM's.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from enum import StrEnum
from typing import Any


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


@dataclass(frozen=True, slots=True)
class LevelStats:
    """Aggregated metrics of one (engine, concurrency) level. Latencies are in milliseconds."""

    engine: str
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
    peak_rss_mib: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LevelStats:
        return cls(**{f.name: data[f.name] for f in fields(cls)})


@dataclass(frozen=True, slots=True)
class EngineRatio:
    """``numerator / denominator`` engine ratios at one concurrency; None where undefined."""

    concurrency: int
    numerator: str
    denominator: str
    output_throughput_ratio: float | None
    p95_e2el_ratio: float | None


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


def aggregate(
    engine: str,
    concurrency: int,
    results: Sequence[RequestResult],
    duration_s: float,
    peak_rss_mib: float | None = None,
) -> LevelStats:
    """Aggregate one level. Latency and token statistics cover completed requests only, as vLLM's do."""
    done = [r for r in results if r.outcome is Outcome.COMPLETED]
    latencies = [r.latency_s for r in done]
    ttfts = [r.ttft_s for r in done if r.ttft_s is not None]
    output_tokens = sum(r.completion_tokens for r in done)
    per_second = 1.0 / duration_s if duration_s > 0 else 0.0
    return LevelStats(
        engine=engine,
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
        peak_rss_mib=peak_rss_mib,
    )


def safe_ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def engine_ratios(
    records: Iterable[LevelStats], numerator: str = "batched", denominator: str = "threadpool"
) -> list[EngineRatio]:
    """Per-concurrency ratios for every concurrency both engines ran, sorted by concurrency."""
    by_key = {(r.engine, r.concurrency): r for r in records}
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
