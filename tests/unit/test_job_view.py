"""How jobs are shown (``textgen.jobs.view``, rendered by ``textgen.api.jobs``): the throughput and
start-time estimate of a queued job, its queue part from a real SQLite store, the webhook part of the view,
and webhook bodies that are exactly ``GET /jobs/{id}``'s JSON."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from textgen.api.jobs import job_view
from textgen.jobs.store import JobState, JobStore, WebhookState
from textgen.jobs.view import estimate, job_payload, jobs_per_second, queue_estimate

REQUEST = {"prompt": "The future of AI is", "max_new_tokens": 3}
RESULT = {"generated_text": " bright", "model": "tiny", "request_id": "req", "completion_tokens": 1}
OWNER = "elsewhere-host:1:worker"
NOW = 1_700_000_000.0


def at(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)


# ----- jobs_per_second and estimate ----------------------------------------------------------------------------


@pytest.mark.parametrize("completions", [[], [NOW]])
def test_fewer_than_two_completions_measure_nothing(completions: list[float]) -> None:
    assert jobs_per_second(completions) is None
    queued = estimate(3, completions, NOW)
    assert queued.position == 3
    assert queued.jobs_per_second is None
    assert queued.estimated_start_at is None


def test_completions_at_the_same_instant_measure_nothing() -> None:
    assert jobs_per_second([NOW, NOW, NOW]) is None
    assert estimate(0, [NOW, NOW], NOW).estimated_start_at is None


@pytest.mark.parametrize(
    ("completions", "rate"),
    [
        ([NOW, NOW - 2.0], 0.5),  # one interval of 2 s
        ([NOW, NOW - 1.0, NOW - 4.0], 0.5),  # two intervals over 4 s, however uneven
        ([NOW - 10.0 + 0.1 * i for i in range(100, 0, -1)], 10.0),  # 99 intervals over 9.9 s
        ([NOW, NOW - 3.0, NOW - 6.0, NOW - 9.0], 1 / 3),
    ],
)
def test_rate_is_intervals_over_span(completions: list[float], rate: float) -> None:
    assert jobs_per_second(completions) == pytest.approx(rate)


@pytest.mark.parametrize("position", [0, 1, 4])
def test_estimate_is_now_plus_position_plus_one_over_rate(position: int) -> None:
    completions = [NOW - 1.0, NOW - 3.0, NOW - 5.0]  # 0.5 jobs per second
    queued = estimate(position, completions, NOW)
    assert queued.position == position
    assert queued.jobs_per_second == 0.5
    assert queued.estimated_start_at == at(NOW + (position + 1) * 2.0)


def test_shown_rate_is_rounded_but_estimate_uses_the_measured_rate() -> None:
    completions = [NOW, NOW - 3.0]  # 1/3 jobs per second
    queued = estimate(0, completions, NOW)
    assert queued.jobs_per_second == 0.3333
    assert queued.estimated_start_at == at(NOW + 3.0)


def test_later_positions_start_later() -> None:
    completions = [NOW - 0.5, NOW - 1.0, NOW - 2.5]
    starts = [estimate(position, completions, NOW).estimated_start_at for position in range(5)]
    assert all(start is not None and start > at(NOW) for start in starts)
    assert starts == sorted(starts) and len(set(starts)) == 5


# ----- queue_estimate on a real store ---------------------------------------------------------------------------


async def test_queue_estimate_only_for_queued_jobs(store: JobStore) -> None:
    jobs = [await store.create(REQUEST, request_id=f"r{i}") for i in range(3)]
    for position, job in enumerate(jobs):
        queued = await queue_estimate(store, job)
        assert queued is not None and queued.position == position
        assert queued.estimated_start_at is None  # nothing finished yet

    claimed = await store.claim_next(OWNER, 60.0)
    assert claimed is not None and claimed.id == jobs[0].id
    assert await queue_estimate(store, claimed) is None  # running
    # A job read while queued but claimed since has no estimate either.
    assert await queue_estimate(store, jobs[0]) is None
    assert await store.finish(claimed.id, OWNER, JobState.SUCCEEDED, result=RESULT)
    assert await queue_estimate(store, await store.get(claimed.id)) is None  # succeeded

    moved_up = await queue_estimate(store, jobs[2])
    assert moved_up is not None and moved_up.position == 1


# ----- the webhook part of the view -------------------------------------------------------------------------------


async def test_webhook_part_follows_the_delivery(store: JobStore) -> None:
    plain = await store.create(REQUEST, request_id="plain")
    assert job_view(plain).webhook is None

    job = await store.create(REQUEST, request_id="hooked", callback_url="https://example.com/hook")
    waiting = job_view(job).webhook
    assert waiting is not None
    assert (waiting.url, waiting.state, waiting.attempts, waiting.last_attempt_at) == (
        "https://example.com/hook",
        "waiting",
        0,
        None,
    )

    await store.claim_next(OWNER, 60.0)  # the plain job
    await store.claim_next(OWNER, 60.0)
    assert await store.finish(job.id, OWNER, JobState.FAILED, error="boom")
    pending = job_view(await store.get(job.id)).webhook
    assert pending is not None and pending.state == "pending"

    assert await store.claim_webhook("sender", 60.0) is not None
    assert await store.record_webhook(job.id, "sender", WebhookState.FAILED, attempts=4, error="HTTP 500")
    failed = job_view(await store.get(job.id)).webhook
    assert failed is not None
    assert (failed.state, failed.attempts, failed.last_error) == ("failed", 4, "HTTP 500")
    assert failed.last_attempt_at is not None

    body = job_payload(await store.get(job.id))  # what webhook bodies carry: JSON-ready, no queue part
    assert body["state"] == "failed" and body["error"] == "boom" and body["queue"] is None
    assert body["webhook"]["state"] == "failed"


async def test_webhook_body_is_the_views_json(store: JobStore) -> None:
    """The domain renders webhook bodies without the HTTP schema; they must stay exactly the JSON of
    ``JobView`` (times as ISO 8601 UTC, the state's value, the stored result, the webhook part)."""
    result = {
        "generated_text": " bright",
        "model": "tiny",
        "request_id": "req",
        "prompt_tokens": 5,
        "completion_tokens": 1,
        "finish_reason": "length",
        "timings": {"queue_s": 0.001, "time_to_first_token_s": 0.25, "total_s": 0.5},
        "token_logprobs": [{"token": " bright", "token_id": 7, "logprob": -0.5, "top_logprobs": []}],
        "cached_tokens": 0,
    }
    job = await store.create(REQUEST, request_id="hooked", callback_url="https://example.com/hook")
    await store.claim_next(OWNER, 60.0)
    assert await store.finish(job.id, OWNER, JobState.SUCCEEDED, result=result)
    stored = await store.get(job.id)
    body = job_payload(stored)
    assert body == job_view(stored).model_dump(mode="json")
    assert body["result"] == result and body["state"] == "succeeded"
    assert isinstance(body["created_at"], str) and body["created_at"].endswith("Z")
