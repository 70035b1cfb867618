"""How a stored job is shown, as plain data: ``GET /jobs/{id}``, job lists and streams validate their
schemas from it (``textgen.api.jobs``), and webhook bodies are it, JSON-encoded. No HTTP schema here."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic_core import to_jsonable_python

from textgen.jobs.store import Job, JobState, JobStore

# Throughput behind start estimates: the latest completions within this window, cluster-wide.
THROUGHPUT_WINDOW_S = 600.0
THROUGHPUT_SAMPLE = 50


@dataclass(frozen=True)
class QueuePosition:
    """Where a queued job stands: jobs ahead of it, measured throughput, and the estimated start."""

    position: int
    jobs_per_second: float | None
    estimated_start_at: datetime | None


def _time(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


def _webhook(job: Job) -> dict[str, Any] | None:
    if job.callback_url is None:
        return None
    return {
        "url": job.callback_url,
        "state": job.webhook_state.value if job.webhook_state else "waiting",
        "attempts": job.webhook_attempts,
        "last_error": job.webhook_error,
        "last_attempt_at": _time(job.webhook_at),
    }


def job_record(job: Job, queue: QueuePosition | None = None) -> dict[str, Any]:
    """Everything shown about one job, as plain data (the fields of ``GET /jobs/{id}``'s ``JobView``,
    which ``textgen.api.jobs`` validates from this; webhook bodies are this, JSON-encoded). A batch
    line's result (a job with a ``kind``) is the batch's business, not shown here."""
    return {
        "job_id": job.id,
        "state": job.state,
        "request": job.request,
        "result": job.result if job.result and "kind" not in job.request else None,
        "error": job.error,
        "request_id": job.request_id,
        "created_at": datetime.fromtimestamp(job.created_at, UTC),
        "started_at": _time(job.started_at),
        "finished_at": _time(job.finished_at),
        "attempts": job.attempts,
        "queue": None if queue is None else dataclasses.asdict(queue),
        "webhook": _webhook(job),
    }


def job_summary_record(job: Job) -> dict[str, Any]:
    """The listing form: ids, state, times and token counts, never the prompt, result or callback URL."""
    result = job.result or {}
    return {
        "job_id": job.id,
        "state": job.state,
        "request_id": job.request_id,
        "created_at": datetime.fromtimestamp(job.created_at, UTC),
        "started_at": _time(job.started_at),
        "finished_at": _time(job.finished_at),
        "attempts": job.attempts,
        "prompt_tokens": result.get("prompt_tokens"),
        "completion_tokens": result.get("completion_tokens"),
    }


def job_payload(job: Job) -> dict[str, Any]:
    """The job as JSON-ready data (webhook bodies)."""
    return dict(to_jsonable_python(job_record(job)))


def jobs_per_second(completions: Sequence[float]) -> float | None:
    """Completions per second from finish times (newest first); None with fewer than two."""
    if len(completions) < 2:
        return None
    span = completions[0] - completions[-1]
    return (len(completions) - 1) / span if span > 0 else None


def estimate(position: int, completions: Sequence[float], now: float) -> QueuePosition:
    """A queued job starts once the ``position`` jobs ahead of it and one more have left the running set:
    ``(position + 1) / measured jobs per second`` from now. No estimate without measurements."""
    rate = jobs_per_second(completions)
    if rate is None:
        return QueuePosition(position=position, jobs_per_second=None, estimated_start_at=None)
    return QueuePosition(
        position=position,
        jobs_per_second=round(rate, 4),
        estimated_start_at=datetime.fromtimestamp(now + (position + 1) / rate, UTC),
    )


async def queue_estimate(store: JobStore, job: Job) -> QueuePosition | None:
    """Position and estimated start for a queued job; None for any other state."""
    if job.state is not JobState.QUEUED:
        return None
    position = await store.position(job.id)
    if position is None:  # claimed since it was read
        return None
    completions = await store.recent_completions(THROUGHPUT_WINDOW_S, THROUGHPUT_SAMPLE)
    return estimate(position, completions, time.time())
