"""Queue position and estimated start on ``GET /jobs/{id}``, through HTTP with the app lifespan running.

The app's own runner must not claim the jobs these tests queue. It claims when notified (a POST or
DELETE through the API, or one of its jobs ending) and otherwise once per ``job_poll_interval_s``, here
60 s, with one pass right at start. So jobs are created directly in the store, and only after that first
pass: it purges, after claiming, the jobs that ended over ``job_ttl_s`` ago, so a sentinel job that ended
before start (with a tiny ``job_ttl_s``) disappearing says the pass is done. Jobs "run elsewhere" are
claimed and finished in the store under a made-up owner.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import httpx

from tests.support.waiting import wait_until
from textgen.config import Settings
from textgen.jobs.sqlite_store import SQLiteJobStore, sqlite_path_from_url
from textgen.jobs.store import JobState, JobStore

MakeSettings = Callable[..., Any]
AppClient = Callable[..., Any]

ELSEWHERE = "elsewhere-host:1:worker"  # another replica, as far as this app can tell
REQUEST = {"prompt": "The future of AI is", "max_new_tokens": 3}
RESULT = {"generated_text": " bright", "model": "tiny", "request_id": "req", "completion_tokens": 1}


def idle_runner_settings(make_settings: MakeSettings) -> Settings:
    return make_settings(job_poll_interval_s=60.0, job_ttl_s=0.01)


async def run_elsewhere(store: JobStore, expected_id: str) -> float:
    """Claim the next queued job (it must be ``expected_id``) and finish it; returns its finished_at."""
    claimed = await store.claim_next(ELSEWHERE, 600.0)
    assert claimed is not None and claimed.id == expected_id
    assert await store.finish(claimed.id, ELSEWHERE, JobState.SUCCEEDED, result=RESULT)
    finished_at = (await store.get(claimed.id)).finished_at
    assert finished_at is not None
    return finished_at


class SteppingClock:
    """Wall-clock seconds that start ``behind_s`` in the past and advance ``step_s`` at every read: jobs
    that ended long enough ago, or a little apart, without waiting for time to pass."""

    def __init__(self, behind_s: float, step_s: float = 0.0) -> None:
        self._now = time.time() - behind_s
        self._step_s = step_s

    def __call__(self) -> float:
        self._now += self._step_s
        return self._now


async def sentinel_finished_before_start(settings: Settings) -> str:
    """A job that ended (on its store's clock) a hundred TTLs before the app starts, for the runner's first
    pass to purge."""
    store = SQLiteJobStore(sqlite_path_from_url(settings.job_store), clock=SteppingClock(100 * settings.job_ttl_s))
    await store.open()
    try:
        job = await store.create(REQUEST, request_id="sentinel")
        await run_elsewhere(store, job.id)
    finally:
        await store.close()
    return job.id


async def wait_for_first_runner_pass(client: httpx.AsyncClient, sentinel_id: str, timeout_s: float = 30.0) -> None:
    async def purged() -> bool:
        return (await client.get(f"/jobs/{sentinel_id}")).status_code == 404

    await wait_until(purged, timeout_s, "the runner's first pass")


async def get_view(client: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    response = await client.get(f"/jobs/{job_id}")
    assert response.status_code == 200, response.text
    return dict(response.json())


async def queue_of(client: httpx.AsyncClient, job_id: str) -> tuple[dict[str, Any], float, float]:
    """The job's ``queue`` part, with the wall-clock time just before and just after the GET."""
    before = time.time()
    view = await get_view(client, job_id)
    after = time.time()
    assert view["state"] == "queued", view
    assert view["queue"] is not None
    return view["queue"], before, after


def timestamp(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


async def test_queued_jobs_show_position_then_a_start_estimate(
    make_settings: MakeSettings, app_client: AppClient
) -> None:
    settings = idle_runner_settings(make_settings)
    sentinel = await sentinel_finished_before_start(settings)
    async with app_client(settings) as (client, app):
        store = app.state.textgen.store
        await wait_for_first_runner_pass(client, sentinel)

        # Nothing finished in the window yet: positions, but no rate and no estimate.
        first = [await store.create(REQUEST, request_id=f"first-{i}") for i in range(3)]
        for position, job in enumerate(first):
            queue, _, _ = await queue_of(client, job.id)
            assert queue == {"position": position, "jobs_per_second": None, "estimated_start_at": None}

        # Those three run elsewhere, a little apart (on that replica's clock, which reads 50 ms later at every
        # look from a second ago): three completions measured.
        elsewhere = SQLiteJobStore(sqlite_path_from_url(settings.job_store), clock=SteppingClock(1.0, 0.05))
        await elsewhere.open()
        try:
            finished_at = [await run_elsewhere(elsewhere, job.id) for job in first]
        finally:
            await elsewhere.close()
        rate = (len(finished_at) - 1) / (max(finished_at) - min(finished_at))

        second = [await store.create(REQUEST, request_id=f"second-{i}") for i in range(3)]
        starts = []
        for position, job in enumerate(second):
            queue, before, after = await queue_of(client, job.id)
            assert queue["position"] == position
            assert queue["jobs_per_second"] == round(rate, 4)
            start = timestamp(queue["estimated_start_at"])
            # now + (position + 1) / rate, "now" being some moment during the GET (1 ms for rounding).
            assert before + (position + 1) / rate - 1e-3 <= start <= after + (position + 1) / rate + 1e-3
            assert start > after  # in the future
            starts.append(start)
        assert starts[0] < starts[1] < starts[2]

        # Jobs that are not queued have no queue part.
        done = await get_view(client, first[0].id)
        assert done["state"] == "succeeded" and done["queue"] is None

        claimed = await store.claim_next(ELSEWHERE, 600.0)
        assert claimed is not None and claimed.id == second[0].id
        running = await get_view(client, second[0].id)
        assert running["state"] == "running" and running["queue"] is None
        queue, _, _ = await queue_of(client, second[1].id)
        assert queue["position"] == 0  # moved up

        await store.cancel(second[2].id)
        cancelled = await get_view(client, second[2].id)
        assert cancelled["state"] == "cancelled" and cancelled["queue"] is None


async def test_job_lists_do_not_carry_queue_estimates(make_settings: MakeSettings, app_client: AppClient) -> None:
    settings = idle_runner_settings(make_settings)
    sentinel = await sentinel_finished_before_start(settings)
    async with app_client(settings) as (client, app):
        store = app.state.textgen.store
        await wait_for_first_runner_pass(client, sentinel)
        job = await store.create(REQUEST, request_id="listed")

        response = await client.get("/jobs", params={"state": "queued"})
        assert response.status_code == 200, response.text
        [listed] = response.json()["jobs"]
        assert listed["job_id"] == job.id and "queue" not in listed  # only GET /jobs/{id} estimates
        queue, _, _ = await queue_of(client, job.id)
        assert queue["position"] == 0
