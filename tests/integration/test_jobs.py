"""Integration tests of the background-job routes: POST /generate_background, GET /jobs, GET and
DELETE /jobs/{job_id}, through HTTP with the app lifespan running (real engine, runner and SQLite store).

Jobs are polled with short sleeps under an overall timeout; ``job_poll_interval_s`` is 0.05 in the
test settings, so the runner notices work quickly.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from datetime import datetime
from typing import Any

import httpx
import pytest

from tests.support.waiting import wait_until

MakeSettings = Callable[..., Any]
AppClient = Callable[..., Any]

PROMPT = "The future of AI is"
TERMINAL = {"succeeded", "failed", "cancelled"}
# Long enough to still be running when the test acts on it (the tiny model's context caps it at ~1000).
LONG_JOB = {"prompt": PROMPT, "max_new_tokens": 1000, "ignore_eos": True}


def assert_error(response: httpx.Response, status: int) -> Any:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"detail", "request_id"}, body
    assert response.headers["X-Request-ID"] == body["request_id"]
    return body["detail"]


async def submit(client: httpx.AsyncClient, body: dict[str, Any], **headers: str) -> dict[str, Any]:
    response = await client.post("/generate_background", json=body, headers=headers)
    assert response.status_code == 202, response.text
    accepted = response.json()
    assert response.headers["Location"] == accepted["status_url"] == f"/jobs/{accepted['job_id']}"
    assert response.headers["X-Request-ID"] == accepted["request_id"]
    assert accepted["state"] == "queued"
    return accepted


async def poll_job(
    client: httpx.AsyncClient,
    job_id: str,
    until: Callable[[dict[str, Any]], bool] = lambda view: view["state"] in TERMINAL,
    timeout_s: float = 30.0,
) -> tuple[dict[str, Any], list[str]]:
    """GET the job until ``until(view)``; returns the last view and the distinct states seen, in order."""
    seen: list[str] = []
    view: dict[str, Any] = {}

    async def there() -> bool:
        response = await client.get(f"/jobs/{job_id}")
        assert response.status_code == 200, response.text
        view.clear()
        view.update(response.json())
        if not seen or seen[-1] != view["state"]:
            seen.append(view["state"])
        return until(view)

    try:
        await wait_until(there, timeout_s, f"job {job_id}", interval_s=0.02)
    except AssertionError:
        raise AssertionError(f"job {job_id} did not get there in {timeout_s}s: states {seen}") from None
    return view, seen


def at(view: dict[str, Any], field: str) -> datetime:
    return datetime.fromisoformat(view[field])


async def list_jobs(client: httpx.AsyncClient, **params: Any) -> list[dict[str, Any]]:
    response = await client.get("/jobs", params=params)
    assert response.status_code == 200, response.text
    return list(response.json()["jobs"])


# ----- the happy path --------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["batched", "threadpool"])
async def test_background_job_runs_to_success(engine: str, make_settings: MakeSettings, app_client: AppClient) -> None:
    request = {"prompt": PROMPT, "max_new_tokens": 40, "ignore_eos": True, "seed": 11}
    async with app_client(make_settings(engine=engine)) as (client, app):
        accepted = await submit(client, request, **{"X-Request-ID": "job-req-1"})
        assert accepted["request_id"] == "job-req-1"
        view, seen = await poll_job(client, accepted["job_id"])

        assert view["state"] == "succeeded", view
        assert seen[0] in ("queued", "running"), seen  # observed before it finished
        assert seen == [s for s in ("queued", "running", "succeeded") if s in seen], seen
        assert view["job_id"] == accepted["job_id"]
        assert view["request_id"] == "job-req-1"
        assert view["error"] is None
        assert view["attempts"] == 1
        assert view["request"]["prompt"] == PROMPT
        assert view["request"]["max_new_tokens"] == 40
        assert view["request"]["seed"] == 11
        # created_at <= started_at is not asserted here: it can fail, see test_job_never_starts_before_it_was_created.
        assert at(view, "started_at") <= at(view, "finished_at")
        assert at(view, "created_at") <= at(view, "finished_at")

        result = view["result"]
        assert result["generated_text"]
        assert result["completion_tokens"] == 40
        assert result["finish_reason"] == "length"
        assert result["model"] == app.state.textgen.model.name
        assert result["request_id"] == "job-req-1"

        # Same seeded request, run interactively: same text.
        sync = await client.post("/generate", json=request)
        assert sync.json()["generated_text"] == result["generated_text"]


async def test_list_jobs_filters_and_limits(make_settings: MakeSettings, app_client: AppClient) -> None:
    async with app_client(make_settings()) as (client, _app):
        assert await list_jobs(client) == []
        first = await submit(client, {"prompt": PROMPT, "max_new_tokens": 3})
        await poll_job(client, first["job_id"])
        second = await submit(client, {"prompt": "Once upon a time", "max_new_tokens": 3})
        await poll_job(client, second["job_id"])

        newest = await list_jobs(client, state="succeeded", limit=1)
        assert [job["job_id"] for job in newest] == [second["job_id"]]
        assert newest[0]["state"] == "succeeded" and isinstance(newest[0]["completion_tokens"], int)
        # A listing holds summaries: the prompt and the text are only on GET /jobs/{id}.
        assert "request" not in newest[0] and "result" not in newest[0] and PROMPT not in str(newest)
        assert [job["job_id"] for job in await list_jobs(client)] == [second["job_id"], first["job_id"]]
        assert await list_jobs(client, state="queued") == []
        assert await list_jobs(client, state="cancelled") == []


@pytest.mark.parametrize(
    ("params", "field"),
    [({"state": "bogus"}, "state"), ({"limit": 0}, "limit"), ({"limit": 1001}, "limit"), ({"limit": "x"}, "limit")],
)
async def test_list_jobs_bad_query_is_422(
    params: dict[str, Any], field: str, make_settings: MakeSettings, app_client: AppClient
) -> None:
    async with app_client(make_settings()) as (client, _app):
        detail = assert_error(await client.get("/jobs", params=params), 422)
        assert isinstance(detail, list)
        assert any(error["loc"] == ["query", field] for error in detail), detail


# ----- 404, 409 ---------------------------------------------------------------------------------------


async def test_unknown_job_is_404_and_finished_job_is_not_cancellable(
    make_settings: MakeSettings, app_client: AppClient
) -> None:
    async with app_client(make_settings()) as (client, _app):
        assert "No job" in assert_error(await client.get("/jobs/does-not-exist"), 404)
        assert "No job" in assert_error(await client.delete("/jobs/does-not-exist"), 404)

        accepted = await submit(client, {"prompt": PROMPT, "max_new_tokens": 3})
        done, _ = await poll_job(client, accepted["job_id"])
        assert done["state"] == "succeeded"
        detail = assert_error(await client.delete(accepted["status_url"]), 409)
        assert "cannot be cancelled" in detail
        after, _ = await poll_job(client, accepted["job_id"])
        assert after["state"] == "succeeded"
        assert after["result"] == done["result"]


# ----- cancellation -------------------------------------------------------------------------------------


async def test_cancel_queued_and_running_jobs(make_settings: MakeSettings, app_client: AppClient) -> None:
    async with app_client(make_settings(job_concurrency=1)) as (client, app):
        running = await submit(client, LONG_JOB)
        queued = await submit(client, LONG_JOB)
        await poll_job(client, running["job_id"], until=lambda view: view["state"] == "running", timeout_s=30)
        queued_view, _ = await poll_job(client, queued["job_id"], until=lambda view: True)
        assert queued_view["state"] == "queued"  # job_concurrency=1 keeps it waiting

        cancelled = await client.delete(queued["status_url"])
        assert cancelled.status_code == 200, cancelled.text
        assert cancelled.json()["state"] == "cancelled"
        assert cancelled.json()["finished_at"] is not None

        cancelled = await client.delete(running["status_url"])
        assert cancelled.status_code == 200, cancelled.text
        assert cancelled.json()["state"] == "cancelled"
        assert cancelled.json()["job_id"] == running["job_id"]

        # The running sequence really stops: the runner lets go of it and the engine's batch empties.
        state = app.state.textgen
        await wait_until(lambda: state.runner.active_jobs == 0 and state.engine.stats().running == 0)
        seen = state.runner.polls
        await wait_until(lambda: state.runner.polls >= seen + 4)  # a few polls: nothing may resurrect them
        for job_id in (running["job_id"], queued["job_id"]):
            view = (await client.get(f"/jobs/{job_id}")).json()
            assert view["state"] == "cancelled", view
            assert view["result"] is None
            assert view["finished_at"] is not None
        assert (await client.get(f"/jobs/{queued['job_id']}")).json()["started_at"] is None
        assert await list_jobs(client, state="succeeded") == []
        assert len(await list_jobs(client, state="cancelled")) == 2

        assert_error(await client.delete(running["status_url"]), 409)  # cancelled is final

        # The runner's only slot is free again.
        after = await submit(client, {"prompt": PROMPT, "max_new_tokens": 3})
        view, _ = await poll_job(client, after["job_id"])
        assert view["state"] == "succeeded"


async def test_running_job_goes_back_to_the_queue_at_shutdown(
    make_settings: MakeSettings, app_client: AppClient
) -> None:
    """Durable jobs: a job running when the app stops is re-queued and picked up by the next start."""
    settings = make_settings(job_concurrency=1)
    async with app_client(settings) as (client, app):
        accepted = await submit(client, LONG_JOB)
        await poll_job(client, accepted["job_id"], until=lambda view: view["state"] == "running", timeout_s=30)
        # "running" in the store comes a moment before the runner holds the job; wait until it is generating.
        engine = app.state.textgen.engine
        await wait_until(lambda: engine.stats().running == 1)

    async with app_client(settings) as (client, _app):
        view, _ = await poll_job(
            client, accepted["job_id"], until=lambda v: v["state"] == "running" and v["attempts"] == 2, timeout_s=30
        )
        assert view["result"] is None
        assert (await client.delete(accepted["status_url"])).json()["state"] == "cancelled"


class CountedLock:
    """A store's lock that counts the callers that started waiting for it (``with lock:``)."""

    def __init__(self, lock: Any) -> None:
        self._lock = lock
        self.entries = 0

    def acquire(self) -> bool:
        return bool(self._lock.acquire())

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> CountedLock:
        self.entries += 1
        self._lock.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._lock.release()


async def test_job_never_starts_before_it_was_created(make_settings: MakeSettings, app_client: AppClient) -> None:
    """The interleaving seen in the wild, made deterministic: a claim (the runner's poll) starts, the store
    is busy with a POST /generate_background inserting its job, then the claim runs and takes that job."""
    from textgen.jobs import sqlite_store
    from textgen.jobs.store import new_job

    async with app_client(make_settings(job_poll_interval_s=60)) as (client, app):  # the runner stays idle
        store = app.state.textgen.store
        lock = store._db._lock = CountedLock(store._db._lock)
        lock.acquire()  # the store is busy (as while another call inserts)
        try:
            entered = lock.entries
            claim = asyncio.ensure_future(store.claim_next("tester:0:claim", 30.0))
            await wait_until(lambda: lock.entries > entered, 10, "the claim waiting for the store")
            job = new_job({"prompt": "Hi"}, "racing-create")  # what create() does...
            sqlite_store._insert(store._db._conn, job)  # ...while it holds the store
        finally:
            store._db._lock.release()
        await claim  # this claim or the runner's own first poll (also waiting) takes the job

        view, _ = await poll_job(client, job.id, until=lambda v: v["started_at"] is not None)
        assert at(view, "created_at") <= at(view, "started_at"), view


# ----- rejected submissions -----------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", ["I hate this", "ＨＡＴＥ", "h\u200bate"])
async def test_blocked_background_prompt_is_400_and_creates_no_job(
    prompt: str, make_settings: MakeSettings, app_client: AppClient
) -> None:
    async with app_client(make_settings()) as (client, _app):
        response = await client.post(
            "/generate_background", json={"prompt": prompt}, headers={"X-Request-ID": "bad-job"}
        )
        assert assert_error(response, 400) == "The prompt was rejected by the content filter."
        assert response.json()["request_id"] == "bad-job"
        assert "Location" not in response.headers
        assert await list_jobs(client) == []


async def test_background_schema_violation_is_422_and_creates_no_job(
    make_settings: MakeSettings, app_client: AppClient
) -> None:
    async with app_client(make_settings()) as (client, _app):
        detail = assert_error(await client.post("/generate_background", json={"prompt": "Hi", "temperature": -1}), 422)
        assert any(error["loc"] == ["body", "temperature"] for error in detail)
        assert await list_jobs(client) == []


async def test_background_prompt_too_long_is_reported(make_settings: MakeSettings, app_client: AppClient) -> None:
    """Either refused up front (400) or accepted and failed with the limit named; never a silent success."""
    long_prompt = " ".join(["fox"] * 30)
    async with app_client(make_settings(max_prompt_tokens=8, warmup=False)) as (client, _app):
        response = await client.post("/generate_background", json={"prompt": long_prompt})
        if response.status_code == 400:
            assert "TEXTGEN_MAX_PROMPT_TOKENS" in assert_error(response, 400)
            assert await list_jobs(client) == []
            return
        assert response.status_code == 202, response.text
        view, _ = await poll_job(client, response.json()["job_id"])
        assert view["state"] == "failed", view
        assert "TEXTGEN_MAX_PROMPT_TOKENS" in view["error"]
        assert view["result"] is None


async def test_background_output_rejected_by_the_filter_fails_the_job(
    make_settings: MakeSettings, app_client: AppClient
) -> None:
    prompt = "Whatever happens"
    request = {"prompt": prompt, "temperature": 0, "max_new_tokens": 20, "ignore_eos": True}
    async with app_client(make_settings()) as (client, _app):
        original = (await client.post("/generate", json=request)).json()["generated_text"]
    words = [w for w in re.findall(r"[a-z]{3,}", original.lower()) if w not in prompt.lower()]
    assert words, f"greedy output has no word to block: {original!r}"

    async with app_client(make_settings(blocked_words=[words[0]], output_filter_action="reject")) as (client, _app):
        accepted = await submit(client, request)
        view, _ = await poll_job(client, accepted["job_id"])
        assert view["state"] == "failed", view
        assert view["error"] == "The generated text was withheld by the content filter."
        assert view["result"] is None
        assert words[0] not in str(view["error"])
