"""The job-store conformance suite: every behaviour test runs against SQLite and Redis (``backend`` in
tests/unit/conftest.py), then a few tests of what only one backend has (files, URLs, connections).

Leases are short (0.3 s) and tests move past them with the stores' injected clock (``store_clock``),
never by sleeping.
"""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import textwrap
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from tests.support.net import free_port
from tests.support.redis import RedisServer
from tests.support.waiting import wait_until
from tests.unit.conftest import SUBPROCESS_STORE, Backend, OpenStore, StoreClock
from textgen.backends import job_store_from_url
from textgen.errors import ConfigError, JobNotCancellableError, JobNotFoundError
from textgen.jobs import sqlite_store as sqlite_mod
from textgen.jobs.redis_store import RedisJobStore
from textgen.jobs.sqlite_store import SQLiteJobStore
from textgen.jobs.store import (
    TERMINAL_STATES,
    Job,
    JobState,
    JobStore,
    WebhookState,
    abandoned_error,
    died_in_phase_error,
)
from textgen.storage.url import REDIS_FORMS

REPO_ROOT = Path(__file__).resolve().parents[2]
LEASE = 30.0  # long enough never to expire within a test
SHORT = 0.3  # a lease the test moves past with store_clock.advance
PAST_SHORT = 0.45
HOOK = "https://example.test/hook"


async def _make(store: JobStore, n: int, callback_url: str | None = None) -> list[Job]:
    return [
        await store.create({"prompt": f"p{i}", "n": i}, request_id=f"req-{i}", callback_url=callback_url)
        for i in range(n)
    ]


async def _claim(store: JobStore, owner: str, lease_s: float = LEASE) -> Job:
    job = await store.claim_next(owner, lease_s)
    assert job is not None
    return job


async def _finished(store: JobStore, n: int = 1, callback_url: str | None = HOOK) -> list[Job]:
    """``n`` jobs that succeeded, in that order."""
    jobs = await _make(store, n, callback_url)
    for job in jobs:
        assert (await _claim(store, "w")).id == job.id
        assert await store.finish(job.id, "w", JobState.SUCCEEDED, result={"text": job.id})
    return jobs


# --- state machine -----------------------------------------------------------------------------------


async def test_create_get_roundtrip(store: JobStore) -> None:
    assert isinstance(store, JobStore)
    job = await store.create({"prompt": "hi", "max_tokens": 5, "nested": {"a": [1, 2.5]}}, request_id="r1")
    assert len(job.id) == 32 and job.state is JobState.QUEUED
    assert job.attempts == 0 and job.owner is None and job.started_at is None and job.finished_at is None
    assert job.lease_until is None and job.callback_url is None and job.webhook_state is None
    assert job.created_at > 0
    assert await store.get(job.id) == job
    hooked = await store.create({}, request_id=None, callback_url=HOOK)
    assert (await store.get(hooked.id)).callback_url == HOOK and hooked.request_id is None


async def test_claim_then_finish_succeeded(store: JobStore) -> None:
    job = await store.create({"prompt": "x"}, request_id=None)
    claimed = await _claim(store, "w1")
    assert claimed.id == job.id
    assert claimed.state is JobState.RUNNING and claimed.owner == "w1" and claimed.attempts == 1
    assert claimed.started_at is not None and claimed.started_at >= job.created_at
    assert await store.get(job.id) == claimed
    assert await store.claim_next("w1", LEASE) is None

    assert await store.finish(job.id, "w1", JobState.SUCCEEDED, result={"text": "ok"})
    done = await store.get(job.id)
    assert done.state is JobState.SUCCEEDED and done.result == {"text": "ok"} and done.error is None
    assert done.finished_at is not None and done.finished_at >= claimed.started_at
    assert done.lease_until is None and done.owner == "w1" and done.webhook_state is None
    # A second finish (e.g. a duplicate runner) does not take effect.
    assert not await store.finish(job.id, "w1", JobState.FAILED, error="late")
    assert await store.get(job.id) == done


async def test_finish_failed_with_error(store: JobStore) -> None:
    job = await store.create({"prompt": "x"}, request_id="r")
    await _claim(store, "w1")
    assert await store.finish(job.id, "w1", JobState.FAILED, error="boom")
    failed = await store.get(job.id)
    assert failed.state is JobState.FAILED and failed.error == "boom" and failed.result is None


async def test_finish_keeps_empty_values(store: JobStore) -> None:
    job = await store.create({}, request_id=None)
    await _claim(store, "w1")
    assert await store.finish(job.id, "w1", JobState.FAILED, result={}, error="")
    failed = await store.get(job.id)
    assert failed.result == {} and failed.error == ""


async def test_finish_rejects_non_final_state(store: JobStore) -> None:
    job = await store.create({}, request_id=None)
    await _claim(store, "w1")
    for bad in (JobState.QUEUED, JobState.RUNNING, JobState.CANCELLED):
        with pytest.raises(ValueError):
            await store.finish(job.id, "w1", bad)
    assert (await store.get(job.id)).state is JobState.RUNNING


async def test_finish_wrong_owner_or_not_running(store: JobStore) -> None:
    job = await store.create({}, request_id=None)
    assert not await store.finish(job.id, "w1", JobState.SUCCEEDED)  # still queued
    claimed = await _claim(store, "w1")
    assert not await store.finish(job.id, "w2", JobState.SUCCEEDED, result={})
    assert not await store.finish("no-such-job", "w1", JobState.SUCCEEDED)
    assert await store.get(job.id) == claimed


async def test_cancel_queued(store: JobStore) -> None:
    job = await store.create({}, request_id=None)
    cancelled = await store.cancel(job.id)
    assert cancelled.state is JobState.CANCELLED and cancelled.finished_at is not None
    assert await store.get(job.id) == cancelled
    assert await store.claim_next("w1", LEASE) is None
    assert await store.position(job.id) is None


async def test_cancel_running_then_finish_is_ignored(store: JobStore) -> None:
    job = await store.create({}, request_id=None)
    await _claim(store, "w1")
    cancelled = await store.cancel(job.id)
    assert cancelled.state is JobState.CANCELLED and cancelled.owner == "w1" and cancelled.lease_until is None
    assert not await store.finish(job.id, "w1", JobState.SUCCEEDED, result={"text": "too late"})
    assert await store.renew("w1", [job.id], LEASE) == set()  # the runner learns it must stop
    assert await store.get(job.id) == cancelled


async def test_cancel_terminal_and_unknown(store: JobStore) -> None:
    job = await store.create({}, request_id=None)
    await _claim(store, "w1")
    await store.finish(job.id, "w1", JobState.SUCCEEDED, result={})
    with pytest.raises(JobNotCancellableError):
        await store.cancel(job.id)
    other = await store.create({}, request_id=None)
    await store.cancel(other.id)
    with pytest.raises(JobNotCancellableError):
        await store.cancel(other.id)
    with pytest.raises(JobNotFoundError):
        await store.cancel("missing")


async def test_get_unknown(store: JobStore) -> None:
    with pytest.raises(JobNotFoundError):
        await store.get("0" * 32)


async def test_release(store: JobStore) -> None:
    first, second = await _make(store, 2)
    await _claim(store, "w1")
    assert not await store.release(first.id, "w2")  # not the owner
    assert not await store.release(second.id, "w1")  # not running
    assert await store.release(first.id, "w1")
    back = await store.get(first.id)
    assert back.state is JobState.QUEUED and back.owner is None and back.started_at is None
    assert back.attempts == 0 and back.lease_until is None  # the attempt that never started does not count
    assert not await store.release(first.id, "w1")
    assert await store.position(first.id) == 0  # back at its place, ahead of the later job
    assert (await _claim(store, "w2")).id == first.id


def test_terminal_states() -> None:
    assert frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}) == TERMINAL_STATES
    assert JobState.RUNNING == "running"


# --- claiming ----------------------------------------------------------------------------------------


async def test_claim_oldest_first(store: JobStore) -> None:
    jobs = await _make(store, 5)
    claimed = [await _claim(store, "w") for _ in range(5)]
    assert [j.id for j in claimed] == [j.id for j in jobs]
    assert await store.claim_next("w", LEASE) is None


async def test_claim_once_concurrent_claimers(store: JobStore, open_store: OpenStore) -> None:
    other = await open_store()
    created = {j.id for j in await _make(store, 30)}

    async def claimer(s: JobStore, owner: str) -> list[str]:
        got = []
        while (job := await s.claim_next(owner, LEASE)) is not None:
            assert job.owner == owner
            got.append(job.id)
        return got

    results = await asyncio.gather(*(claimer((store, other)[i % 2], f"owner-{i}") for i in range(8)))
    got = [job_id for ids in results for job_id in ids]
    assert len(got) == len(set(got)) == 30 and set(got) == created
    assert await store.count(JobState.RUNNING) == 30
    assert await other.count(JobState.QUEUED) == 0
    assert all(j.attempts == 1 for j in await store.list(limit=100))


_CLAIMER = SUBPROCESS_STORE + textwrap.dedent(
    """
    import asyncio, sys

    async def main() -> None:
        s = make_store(*sys.argv[1:4])
        await s.open()
        while (job := await s.claim_next(sys.argv[4], 30.0)) is not None:
            sys.stdout.write(job.id + "\\n")
        await s.close()

    asyncio.run(main())
    """
)


async def test_claim_once_two_processes(store: JobStore, backend: Backend) -> None:
    created = {j.id for j in await _make(store, 200)}
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", _CLAIMER, *backend.argv(), f"proc-{i}", cwd=REPO_ROOT, stdout=subprocess.PIPE
        )
        for i in range(2)
    ]
    outs = [await p.communicate() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    got = [line for out, _ in outs for line in out.decode().split()]
    assert len(got) == len(set(got)) == 200 and set(got) == created
    assert await store.count(JobState.RUNNING) == 200


async def test_cancelled_claim_is_handed_back(store: JobStore, backend: Backend) -> None:
    job = await store.create({}, request_id=None)
    async with backend.writes_held(store) as held:  # the claim lands only after its caller was cancelled
        task = asyncio.create_task(store.claim_next("w1", LEASE))

        async def claim_waiting() -> bool:
            return await held.waiting() > 0

        await wait_until(claim_waiting, 10, "the claim waiting for the store")
        task.cancel()  # delivered at the task's next step, whether or not the claim has landed by then
    with pytest.raises(asyncio.CancelledError):
        await task
    back = await store.get(job.id)
    assert back.state is JobState.QUEUED and back.owner is None and back.attempts == 0
    assert await store.position(job.id) == 0


# --- leases ------------------------------------------------------------------------------------------


async def test_claim_sets_lease(store: JobStore) -> None:
    await store.create({}, request_id=None)
    before = time.time()
    job = await _claim(store, "w1", lease_s=5.0)
    after = time.time()
    assert job.lease_until is not None and before + 5.0 - 0.01 <= job.lease_until <= after + 5.0 + 0.01
    assert job.started_at is not None and job.lease_until == pytest.approx(job.started_at + 5.0, abs=1e-5)


async def test_renew_extends_only_own_running_jobs(store: JobStore) -> None:
    mine, cancelled, theirs, queued = await _make(store, 4)
    await _claim(store, "w1", lease_s=1.0)
    await _claim(store, "w1", lease_s=1.0)
    other = await _claim(store, "w2", lease_s=1.0)
    await store.cancel(cancelled.id)
    before = (await store.get(mine.id)).lease_until
    assert before is not None
    ids = [mine.id, cancelled.id, theirs.id, queued.id, "missing", mine.id]
    assert await store.renew("w1", ids, 10.0) == {mine.id}
    after = (await store.get(mine.id)).lease_until
    assert after is not None and after >= before + 8.9
    assert await store.get(theirs.id) == other  # another owner's lease is untouched
    assert await store.renew("w1", [], 10.0) == set()
    assert await store.renew("w2", [theirs.id], 10.0) == {theirs.id}


async def test_expired_lease_requeued_then_abandoned(store: JobStore, store_clock: StoreClock) -> None:
    job, later = await _make(store, 2)
    first = await _claim(store, "w1", lease_s=SHORT)
    assert await store.requeue_expired(max_attempts=2) == (0, 0)  # not yet expired
    store_clock.advance(PAST_SHORT)
    assert await store.requeue_expired(max_attempts=2) == (1, 0)
    back = await store.get(job.id)
    assert back.state is JobState.QUEUED and back.owner is None and back.started_at is None
    assert back.lease_until is None and back.attempts == 1  # the attempt that started counts
    assert await store.position(job.id) == 0 and await store.position(later.id) == 1
    # The owner that lost its lease can neither finish nor renew it.
    assert not await store.finish(job.id, "w1", JobState.SUCCEEDED, result={"text": "late"})
    assert await store.renew("w1", [job.id], LEASE) == set()
    assert await store.get(job.id) == back

    second = await _claim(store, "w2", lease_s=SHORT)
    assert second.id == job.id and second.attempts == 2 and second.started_at is not None
    assert first.started_at is not None and second.started_at > first.started_at
    store_clock.advance(PAST_SHORT)
    assert await store.requeue_expired(max_attempts=2) == (0, 1)
    failed = await store.get(job.id)
    assert failed.state is JobState.FAILED and failed.error == abandoned_error(2) and failed.result is None
    assert failed.finished_at is not None and failed.lease_until is None and failed.attempts == 2
    assert await store.recent_completions(60, 10) == [pytest.approx(failed.finished_at)]
    assert await store.requeue_expired(max_attempts=2) == (0, 0)
    assert (await store.get(later.id)).state is JobState.QUEUED


async def test_new_owner_finishes_after_lease_lost(store: JobStore, store_clock: StoreClock) -> None:
    job = await store.create({}, request_id=None)
    await _claim(store, "w1", lease_s=SHORT)
    store_clock.advance(PAST_SHORT)
    assert await store.requeue_expired(max_attempts=3) == (1, 0)
    taken = await _claim(store, "w2")
    assert not await store.finish(job.id, "w1", JobState.FAILED, error="late")
    assert await store.get(job.id) == taken  # nothing written by the old owner
    assert await store.renew("w1", [job.id], LEASE) == set()
    assert await store.renew("w2", [job.id], LEASE) == {job.id}
    assert await store.finish(job.id, "w2", JobState.SUCCEEDED, result={"text": "ok"})
    done = await store.get(job.id)
    assert done.state is JobState.SUCCEEDED and done.owner == "w2" and done.result == {"text": "ok"}


async def test_renewed_lease_is_not_requeued(store: JobStore, store_clock: StoreClock) -> None:
    job = await store.create({}, request_id=None)
    await _claim(store, "w1", lease_s=SHORT)
    for _ in range(3):
        store_clock.advance(SHORT / 2)
        assert await store.renew("w1", [job.id], SHORT) == {job.id}
        assert await store.requeue_expired(max_attempts=1) == (0, 0)
    assert (await store.get(job.id)).state is JobState.RUNNING


async def test_job_dead_in_a_marked_phase_is_failed_not_requeued(store: JobStore, store_clock: StoreClock) -> None:
    """A process that died while its job was marked (compiling a constraint) fails the job at its first
    death, whatever its attempts, so a request that crashes the server is not retried into a loop."""
    risky, plain = await _make(store, 2)
    await _claim(store, "w1", lease_s=SHORT)
    await _claim(store, "w1", lease_s=SHORT)
    assert await store.set_phase(risky.id, "w1", "compiling its constraint")
    assert not await store.set_phase(risky.id, "someone-else", "x")  # only the owner marks it
    assert (await store.get(risky.id)).phase == "compiling its constraint"
    store_clock.advance(PAST_SHORT)
    assert await store.requeue_expired(max_attempts=3) == (1, 1)
    failed = await store.get(risky.id)
    assert failed.state is JobState.FAILED and failed.attempts == 1 and failed.phase is None
    assert failed.error == died_in_phase_error("compiling its constraint")
    assert "died while compiling its constraint" in failed.error and failed.finished_at is not None
    assert failed.webhook_state is None and failed.result is None
    # A job killed outside a marked phase (mid-generation, e.g. kill -9) is re-queued as before.
    back = await store.get(plain.id)
    assert back.state is JobState.QUEUED and back.phase is None


async def test_cleared_phase_is_requeued_and_requeue_clears_the_phase(store: JobStore, store_clock: StoreClock) -> None:
    job, other = await _make(store, 2)
    await _claim(store, "w1", lease_s=SHORT)
    assert await store.set_phase(job.id, "w1", "compiling its constraint")
    assert await store.set_phase(job.id, "w1", None)
    assert (await store.get(job.id)).phase is None
    store_clock.advance(PAST_SHORT)
    assert await store.requeue_expired(max_attempts=3) == (1, 0)
    assert (await store.get(job.id)).state is JobState.QUEUED
    # A graceful stop (requeue_owned) and a release hand a marked job back unmarked.
    again = await _claim(store, "w2")
    assert await store.set_phase(again.id, "w2", "compiling its constraint")
    assert await store.requeue_owned("w2") == 1
    assert (await store.get(job.id)).phase is None
    again = await _claim(store, "w3")
    assert await store.set_phase(again.id, "w3", "compiling its constraint")
    assert await store.release(again.id, "w3")
    assert (await store.get(job.id)).phase is None
    # Finishing clears it too, and a job that is not running cannot be marked.
    again = await _claim(store, "w4")
    assert await store.set_phase(again.id, "w4", "compiling its constraint")
    assert await store.finish(again.id, "w4", JobState.SUCCEEDED, result={})
    assert (await store.get(job.id)).phase is None
    assert not await store.set_phase(job.id, "w4", "compiling its constraint")
    assert not await store.set_phase(other.id, "w4", "compiling its constraint")  # queued


# --- re-queueing -------------------------------------------------------------------------------------


async def test_requeue_owned(store: JobStore) -> None:
    j1, j2, j3 = await _make(store, 3)
    await _claim(store, "a")
    await _claim(store, "a")
    await _claim(store, "b")
    assert await store.requeue_owned("a") == 2
    assert await store.requeue_owned("a") == 0
    for j in (j1, j2):
        back = await store.get(j.id)
        assert back.state is JobState.QUEUED and back.owner is None and back.started_at is None
        assert back.attempts == 1 and back.lease_until is None
    assert (await store.get(j3.id)).owner == "b"
    assert [await store.position(j.id) for j in (j1, j2)] == [0, 1]
    reclaimed = await _claim(store, "c")
    assert reclaimed.id == j1.id and reclaimed.attempts == 2


async def test_requeue_owned_releases_webhook_claims(store: JobStore) -> None:
    mine, theirs = await _finished(store, 2)
    assert (await store.claim_webhook("a", LEASE) or mine).id == mine.id
    assert (await store.claim_webhook("b", LEASE) or mine).id == theirs.id
    assert await store.claim_webhook("c", LEASE) is None
    assert await store.requeue_owned("a") == 0  # no running jobs, but its webhook claim is released
    taken = await store.claim_webhook("c", LEASE)
    assert taken is not None and taken.id == mine.id and taken.webhook_state is WebhookState.PENDING
    assert not await store.record_webhook(mine.id, "a", WebhookState.DELIVERED, attempts=1, error=None)
    assert await store.claim_webhook("c", LEASE) is None  # b still holds its claim


async def test_requeue_orphaned(store: JobStore) -> None:
    dead1, dead2, alive, queued = await _make(store, 4)
    for owner in ("dead", "dead", "alive"):
        await _claim(store, owner)
    done = await store.create({}, request_id=None)
    await store.cancel(done.id)
    asked: list[str] = []

    def is_alive(owner: str) -> bool:
        asked.append(owner)
        return owner == "alive"

    assert await store.requeue_orphaned(is_alive) == 2
    assert sorted(asked) == ["alive", "dead"]
    orphan = await store.get(dead2.id)
    assert orphan.state is JobState.RUNNING and orphan.owner == "dead" and orphan.lease_until == 0
    alive_lease = (await store.get(alive.id)).lease_until
    assert alive_lease is not None and alive_lease > time.time()
    # The next requeue_expired of any process takes them without waiting for their leases.
    assert await store.requeue_expired(max_attempts=3) == (2, 0)
    assert (await store.get(alive.id)).state is JobState.RUNNING
    assert (await store.get(done.id)).state is JobState.CANCELLED
    requeued = await store.get(dead2.id)
    assert requeued.state is JobState.QUEUED and requeued.owner is None and requeued.attempts == 1
    assert (await store.get(queued.id)).attempts == 0
    assert await store.count(JobState.QUEUED) == 3
    first = await _claim(store, "new")
    assert first.id == dead1.id and first.attempts == 2
    assert await store.requeue_orphaned(lambda _o: True) == 0
    assert await store.requeue_orphaned(lambda _o: False) == 2  # "alive" and "new" both died now


# --- queries -----------------------------------------------------------------------------------------


async def test_list_filter_limit_newest_first(store: JobStore) -> None:
    jobs = await _make(store, 6)
    await _claim(store, "w")  # jobs[0] -> running
    await store.cancel(jobs[5].id)
    everything = await store.list()
    assert [j.id for j in everything] == [j.id for j in reversed(jobs)]
    assert everything[0] == await store.get(jobs[5].id)
    assert [j.id for j in await store.list(limit=2)] == [jobs[5].id, jobs[4].id]
    queued = await store.list(state=JobState.QUEUED)
    assert [j.id for j in queued] == [jobs[4].id, jobs[3].id, jobs[2].id, jobs[1].id]
    assert [j.id for j in await store.list(state=JobState.QUEUED, limit=1)] == [jobs[4].id]
    assert [j.id for j in await store.list(state=JobState.RUNNING)] == [jobs[0].id]
    assert [j.id for j in await store.list(state=JobState.CANCELLED)] == [jobs[5].id]
    assert await store.list(state=JobState.FAILED) == []
    assert await store.list(limit=0) == []
    with pytest.raises(ValueError):
        await store.list(limit=-1)


async def test_states_and_count(store: JobStore) -> None:
    a, b, c = await _make(store, 3)
    await _claim(store, "w")
    await store.cancel(c.id)
    got = await store.states([a.id, b.id, c.id, "missing", a.id])
    assert got == {a.id: JobState.RUNNING, b.id: JobState.QUEUED, c.id: JobState.CANCELLED}
    assert await store.states([]) == {}
    assert await store.count(JobState.QUEUED) == 1
    assert await store.count(JobState.RUNNING) == 1
    assert await store.count(JobState.CANCELLED) == 1
    assert await store.count(JobState.SUCCEEDED) == 0


async def test_states_many_ids(store: JobStore) -> None:
    jobs = await _make(store, 3)
    ids = [j.id for j in jobs] + [f"missing-{i}" for i in range(1200)]
    assert set(await store.states(ids)) == {j.id for j in jobs}


async def test_position(store: JobStore) -> None:
    a, b, c = await _make(store, 3)
    assert [await store.position(j.id) for j in (a, b, c)] == [0, 1, 2]
    await _claim(store, "w")
    assert [await store.position(j.id) for j in (a, b, c)] == [None, 0, 1]
    await store.cancel(b.id)
    assert [await store.position(j.id) for j in (a, b, c)] == [None, None, 0]
    d = await store.create({}, request_id=None)
    assert await store.position(d.id) == 1
    assert await store.position("missing") is None


async def test_recent_completions(store: JobStore, store_clock: StoreClock) -> None:
    (old,) = await _finished(store, 1, callback_url=None)
    store_clock.advance(PAST_SHORT)
    ok, bad, cancelled, running = await _make(store, 4)
    await _claim(store, "w")
    assert await store.finish(ok.id, "w", JobState.SUCCEEDED, result={})
    await _claim(store, "w")
    assert await store.finish(bad.id, "w", JobState.FAILED, error="boom")
    await store.cancel(cancelled.id)
    await _claim(store, "w")
    times = [(await store.get(j.id)).finished_at for j in (bad, ok, old)]
    assert await store.recent_completions(60, 10) == [pytest.approx(t) for t in times]  # newest first
    assert await store.recent_completions(60, 1) == [pytest.approx(times[0])]
    assert await store.recent_completions(SHORT, 10) == [pytest.approx(t) for t in times[:2]]  # the window
    assert await store.recent_completions(60, 0) == []
    store_clock.advance(PAST_SHORT)
    assert await store.recent_completions(SHORT, 10) == []
    assert (await store.get(running.id)).state is JobState.RUNNING


async def test_purge_finished(store: JobStore, backend: Backend, store_clock: StoreClock) -> None:
    old_done, fresh_done, claimed_job, waiting = await _make(store, 4)
    old_keyed, _ = await store.create_idempotent({"k": 1}, request_id=None, key="old-key", ttl_s=3600)
    kept_keyed, _ = await store.create_idempotent({"k": 2}, request_id=None, key="kept-key", ttl_s=3600)
    assert (await _claim(store, "w")).id == old_done.id
    await store.finish(old_done.id, "w", JobState.SUCCEEDED, result={})
    old_cancelled = await store.create({}, request_id=None)
    await store.cancel(old_cancelled.id)
    await store.cancel(old_keyed.id)
    store_clock.advance(PAST_SHORT)
    assert (await _claim(store, "w")).id == fresh_done.id
    await store.finish(fresh_done.id, "w", JobState.FAILED, error="x")
    await _claim(store, "w")  # claimed_job -> running

    assert await store.purge_finished(older_than_s=SHORT) == 3
    for gone in (old_done, old_cancelled, old_keyed):
        with pytest.raises(JobNotFoundError):
            await store.get(gone.id)
    assert backend.idempotency_keys() == ["anonymous kept-key"]  # the record went with its job
    assert await store.purge_finished(older_than_s=SHORT) == 0
    assert await store.list(state=JobState.CANCELLED) == []
    assert await store.recent_completions(60, 10) == [pytest.approx((await store.get(fresh_done.id)).finished_at)]
    # Non-terminal jobs are never purged, however old.
    store_clock.advance(0.05)
    assert await store.purge_finished(older_than_s=0.01) == 1  # fresh_done
    remaining = await store.states([claimed_job.id, waiting.id, kept_keyed.id, fresh_done.id])
    assert remaining == {claimed_job.id: JobState.RUNNING, waiting.id: JobState.QUEUED, kept_keyed.id: JobState.QUEUED}
    assert [j.id for j in await store.list()] == [kept_keyed.id, waiting.id, claimed_job.id]
    assert await store.recent_completions(60, 10) == []


# --- webhooks ----------------------------------------------------------------------------------------


async def test_webhook_pending_on_finish_cancel_and_abandonment(store: JobStore, store_clock: StoreClock) -> None:
    succeeded, cancelled, abandoned = await _make(store, 3, callback_url=HOOK)
    plain = await store.create({}, request_id=None)
    await _claim(store, "w")
    assert await store.finish(succeeded.id, "w", JobState.SUCCEEDED, result={})
    await store.cancel(cancelled.id)
    await _claim(store, "w", lease_s=SHORT)  # abandoned
    queued_hook = await store.get(abandoned.id)
    assert queued_hook.webhook_state is None and queued_hook.callback_url == HOOK
    await _claim(store, "w")  # plain
    assert await store.claim_webhook("x", LEASE) is not None  # the succeeded one: claims go oldest first
    store_clock.advance(PAST_SHORT)
    assert await store.requeue_expired(max_attempts=1) == (0, 1)
    assert await store.finish(plain.id, "w", JobState.SUCCEEDED, result={})
    for job_id in (succeeded.id, cancelled.id, abandoned.id):
        job = await store.get(job_id)
        assert job.webhook_state is WebhookState.PENDING and job.webhook_attempts == 0 and job.webhook_at is None
    assert (await store.get(plain.id)).webhook_state is None
    claimed = [await store.claim_webhook("y", LEASE) for _ in range(3)]
    assert [j.id if j else None for j in claimed] == [cancelled.id, abandoned.id, None]


async def test_claim_webhook_once(store: JobStore, open_store: OpenStore) -> None:
    other = await open_store()
    jobs = await _finished(store, 5)
    claims = await asyncio.gather(*((store, other)[i % 2].claim_webhook(f"d{i}", LEASE) for i in range(12)))
    got = [j for j in claims if j is not None]
    assert sorted(j.id for j in got) == sorted(j.id for j in jobs) and len(got) == 5
    for job in got:
        assert job.webhook_state is WebhookState.PENDING and job.callback_url == HOOK
        assert job.state is JobState.SUCCEEDED and job.result == {"text": job.id}
    assert await store.claim_webhook("late", LEASE) is None


async def test_expired_webhook_claim_is_taken_over(store: JobStore, store_clock: StoreClock) -> None:
    (job,) = await _finished(store)
    assert (await store.claim_webhook("a", SHORT) or job).id == job.id
    assert await store.claim_webhook("b", SHORT) is None
    store_clock.advance(PAST_SHORT)
    taken = await store.claim_webhook("b", LEASE)
    assert taken is not None and taken.id == job.id
    assert not await store.record_webhook(job.id, "a", WebhookState.DELIVERED, attempts=1, error=None)
    assert await store.record_webhook(job.id, "b", WebhookState.DELIVERED, attempts=1, error=None)
    assert (await store.get(job.id)).webhook_state is WebhookState.DELIVERED


async def test_record_webhook(store: JobStore, store_clock: StoreClock) -> None:
    delivered, failed = await _finished(store, 2)
    assert (await store.claim_webhook("a", LEASE) or failed).id == delivered.id
    before = time.time()
    assert await store.record_webhook(delivered.id, "a", WebhookState.PENDING, attempts=1, error="HTTP 503")
    progress = await store.get(delivered.id)
    assert progress.webhook_state is WebhookState.PENDING and progress.webhook_attempts == 1
    assert progress.webhook_error == "HTTP 503" and progress.webhook_at is not None
    assert before - 0.01 <= progress.webhook_at <= time.time() + 0.01
    assert (await store.claim_webhook("b", LEASE) or delivered).id == failed.id  # a kept its claim
    assert await store.claim_webhook("c", LEASE) is None
    assert not await store.record_webhook(delivered.id, "b", WebhookState.DELIVERED, attempts=9, error=None)
    assert not await store.record_webhook("missing", "a", WebhookState.DELIVERED, attempts=1, error=None)

    assert await store.record_webhook(delivered.id, "a", WebhookState.DELIVERED, attempts=2, error=None)
    done = await store.get(delivered.id)
    assert done.webhook_state is WebhookState.DELIVERED and done.webhook_attempts == 2
    assert done.webhook_error is None and done.state is JobState.SUCCEEDED
    assert not await store.record_webhook(delivered.id, "a", WebhookState.FAILED, attempts=3, error="late")
    assert await store.get(delivered.id) == done

    assert await store.record_webhook(failed.id, "b", WebhookState.FAILED, attempts=5, error="gave up")
    gave_up = await store.get(failed.id)
    assert gave_up.webhook_state is WebhookState.FAILED and gave_up.webhook_error == "gave up"
    assert await store.claim_webhook("c", LEASE) is None  # outcomes are final
    store_clock.advance(0.01)
    assert await store.requeue_owned("a") == 0
    assert await store.claim_webhook("c", LEASE) is None


async def test_webhook_of_purged_job_is_gone(store: JobStore, store_clock: StoreClock) -> None:
    (job,) = await _finished(store)
    store_clock.advance(0.05)
    assert await store.purge_finished(older_than_s=0.01) == 1
    assert await store.claim_webhook("a", LEASE) is None
    assert not await store.record_webhook(job.id, "a", WebhookState.DELIVERED, attempts=1, error=None)


# --- lifecycle ---------------------------------------------------------------------------------------


async def test_second_store_object_sees_the_same_jobs(backend: Backend) -> None:
    s1 = backend.new_store()
    await s1.open()
    job = await s1.create({"prompt": "keep me", "temperature": 0.5}, request_id="r-9")
    claimed = await _claim(s1, "p1")
    await s1.close()
    await s1.close()  # idempotent

    s2 = backend.new_store()
    await s2.open()
    try:
        again = await s2.get(job.id)
        assert again == claimed
        assert again.request == {"prompt": "keep me", "temperature": 0.5} and again.request_id == "r-9"
        assert await s2.requeue_orphaned(lambda owner: owner != "p1") == 1
        assert await s2.requeue_expired(max_attempts=3) == (1, 0)
        assert (await s2.claim_next("p2", LEASE)) is not None
    finally:
        await s2.close()


async def test_use_before_open_raises(backend: Backend) -> None:
    s = backend.new_store()
    with pytest.raises(RuntimeError, match="not open"):
        await s.get("x")
    with pytest.raises(RuntimeError, match="not open"):
        await s.claim_next("w", LEASE)


# --- SQLite only: files ------------------------------------------------------------------------------


async def test_sqlite_durable_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "dir" / "jobs.db"  # parent directories are created
    s1 = SQLiteJobStore(path)
    await s1.open()
    job = await s1.create({"prompt": "keep me"}, request_id="r-9")
    await s1.close()
    s2 = SQLiteJobStore(path)
    await s2.open()
    try:
        assert await s2.get(job.id) == job
    finally:
        await s2.close()


async def test_sqlite_open_is_wal(tmp_path: Path) -> None:
    s = SQLiteJobStore(tmp_path / "jobs.db")
    await s.open()
    await s.close()
    with closing(sqlite3.connect(s.path)) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_sqlite_adds_columns_to_an_old_file(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with closing(sqlite3.connect(path)) as raw, raw:
        sqlite_mod.MIGRATIONS[0].apply(raw)  # the first release's tables, before schema versions existed
        raw.execute("INSERT INTO jobs (id, request, state, created_at) VALUES ('old', '{}', 'queued', 1.0)")
    s = SQLiteJobStore(path)
    await s.open()
    try:
        old = await s.get("old")
        assert old.state is JobState.QUEUED and old.lease_until is None and old.webhook_attempts == 0
        assert (await _claim(s, "w")).id == "old"
    finally:
        await s.close()


async def test_sqlite_open_parent_is_a_file(tmp_path: Path) -> None:
    # Tests run as root, where chmod does not stop writes; a parent that is a regular file
    # makes directory creation fail instead.
    blocker = tmp_path / "afile"
    blocker.write_text("not a directory")
    path = blocker / "jobs.db"
    with pytest.raises(ConfigError) as info:
        await SQLiteJobStore(path).open()
    msg = str(info.value)
    assert f"Cannot use job store at {path}" in msg and "TEXTGEN_JOB_STORE" in msg


async def test_sqlite_open_path_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Cannot use job store"):
        await SQLiteJobStore(tmp_path).open()


async def test_sqlite_open_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ConfigError, match="Cannot use job store"):
        await SQLiteJobStore(path).open()


async def test_sqlite_open_read_only_database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A read-only database cannot be made by chmod as root; open it read-only through SQLite instead.
    path = tmp_path / "jobs.db"
    s = SQLiteJobStore(path)
    await s.open()
    await s.close()
    real_connect = sqlite3.connect

    def read_only_connect(database: str, **kwargs: Any) -> sqlite3.Connection:
        return real_connect(f"file:{database}?mode=ro", uri=True, **kwargs)

    monkeypatch.setattr(sqlite_mod.sqlite3, "connect", read_only_connect)
    with pytest.raises(ConfigError, match="readonly"):
        await SQLiteJobStore(path).open()


# --- SQLite only: URLs -------------------------------------------------------------------------------


def test_url_relative(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    s = job_store_from_url("sqlite:///data/jobs.db")
    assert isinstance(s, SQLiteJobStore) and s.path == tmp_path / "data" / "jobs.db"


def test_url_absolute(tmp_path: Path) -> None:
    s = job_store_from_url(f"sqlite:///{tmp_path}/jobs.db")  # tmp_path starts with "/": four slashes
    assert isinstance(s, SQLiteJobStore) and s.path == tmp_path / "jobs.db"
    s2 = job_store_from_url("sqlite:////var/lib/textgen/jobs.db")
    assert isinstance(s2, SQLiteJobStore) and s2.path == Path("/var/lib/textgen/jobs.db")


async def test_url_store_works(tmp_path: Path) -> None:
    s = job_store_from_url(f"sqlite:///{tmp_path}/x/jobs.db")
    await s.open()
    job = await s.create({"a": 1}, request_id=None)
    assert (await s.get(job.id)).request == {"a": 1}
    await s.close()


@pytest.mark.parametrize("url", ["sqlite:///:memory:", "sqlite://:memory:", "sqlite:///file::memory:"])
def test_url_memory_rejected(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        job_store_from_url(url)
    msg = str(info.value)
    if url == "sqlite://:memory:":  # malformed (two slashes): generic message
        assert "TEXTGEN_JOB_STORE" in msg
    else:
        assert "durable" in msg and "sqlite:///" in msg


@pytest.mark.parametrize(
    "url",
    [
        "jobs.db",
        "",
        "sqlite://",
        "sqlite:///",
        "sqlite://host/jobs.db",
        "sqlite:///jobs.db?timeout=5",
        "postgresql://user:hunter2@db/jobs",
        "file:///tmp/jobs.db",
    ],
)
def test_url_garbage(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        job_store_from_url(url)
    msg = str(info.value)
    assert "TEXTGEN_JOB_STORE" in msg
    assert "sqlite:///relative/path/jobs.db" in msg and "sqlite:////absolute/path/jobs.db" in msg
    assert "hunter2" not in msg


# --- Redis only: URLs and connections ----------------------------------------------------------------


@pytest.mark.parametrize(
    "url", ["redis://localhost:6379/0", "rediss://user:hunter2@host/1", " REDIS://:hunter2@10.0.0.1 ", "redis://h"]
)
def test_url_redis(url: str) -> None:
    s = job_store_from_url(url)
    assert isinstance(s, RedisJobStore) and s.prefix == "textgen"
    assert "hunter2" not in repr(s) and "hunter2" not in s.url
    assert repr(s).startswith("RedisJobStore(")


@pytest.mark.parametrize(
    "url",
    [
        "redis://:hunter2@host:notaport/0",
        "redis://:hunter2@host:99999/0",
        "redis://:hunter2@host/db1",
        "redis://:hunter2@host/0/1",
        "redis:///0",
        "redis://:hunter2@host/0?socket_timeout=soon",
    ],
)
def test_url_redis_malformed(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        job_store_from_url(url)
    msg = str(info.value)
    assert "TEXTGEN_JOB_STORE" in msg and REDIS_FORMS in msg and "hunter2" not in msg


async def test_redis_open_closed_port() -> None:
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    s = RedisJobStore.from_url(url)
    with pytest.raises(ConfigError) as info:
        await s.open()
    await s.close()
    msg = str(info.value)
    assert "TEXTGEN_JOB_STORE" in msg and "not reachable" in msg and "127.0.0.1" in msg
    assert "hunter2" not in msg and "hunter2" not in repr(s)


async def test_redis_open_wrong_password(redis_server: RedisServer) -> None:
    # The test server's default user takes any password (nopass), so name a user it does not have.
    url = redis_server.url(0).replace("redis://", "redis://nobody:hunter2@")
    s = RedisJobStore.from_url(url)
    with pytest.raises(ConfigError) as info:
        await s.open()
    await s.close()
    msg = str(info.value)
    assert "TEXTGEN_JOB_STORE" in msg and "authentication failed" in msg and "hunter2" not in msg


async def test_redis_open_bad_db_number(redis_server: RedisServer) -> None:
    s = RedisJobStore.from_url(redis_server.url(999))
    with pytest.raises(ConfigError) as info:
        await s.open()
    await s.close()
    msg = str(info.value)
    assert "TEXTGEN_JOB_STORE" in msg and "database number" in msg


async def test_redis_prefixes_are_separate(redis_server: RedisServer) -> None:
    clock = StoreClock()
    a = RedisJobStore(redis_server.url(0), prefix="sep-a", clock=clock)
    b = RedisJobStore.from_url(redis_server.url(0), prefix="sep-b")
    await a.open()
    await b.open()
    try:
        job = await a.create({}, request_id=None)
        assert await b.claim_next("w", LEASE) is None and await b.count(JobState.QUEUED) == 0
        with pytest.raises(JobNotFoundError):
            await b.get(job.id)
        assert (await _claim(a, "w")).id == job.id
        await a.cancel(job.id)
        clock.advance(1.0)  # a second later: past the TTL below
        assert await a.purge_finished(0.01) == 1
    finally:
        await a.close()
        await b.close()


async def test_redis_store_from_url_opens(redis_server: RedisServer) -> None:
    s = job_store_from_url(redis_server.url(0))
    await s.open()
    try:
        assert await s.count(JobState.QUEUED) >= 0
    finally:
        await s.close()


# --- jobs stored already finished (stored /v1/responses) and deletion --------------------------------


async def test_create_finished_is_an_ended_job_never_claimed(store: JobStore, store_clock: StoreClock) -> None:
    done = await store.create_finished(
        {"kind": "response", "input": ["hi"]}, request_id="r1", result={"output": [1, 2.5]}, tenant="key:a"
    )
    assert done.state is JobState.SUCCEEDED and done.finished_at is not None and done.attempts == 0
    assert await store.get(done.id) == done
    assert (await store.get(done.id, tenant="key:a")).result == {"output": [1, 2.5]}
    with pytest.raises(JobNotFoundError):
        await store.get(done.id, tenant="key:b")
    assert await store.claim_next("w", LEASE) is None  # never queued
    assert [j.id for j in await store.list(tenant="key:a")] == [done.id]
    assert [j.id for j in await store.list(state=JobState.SUCCEEDED)] == [done.id]
    assert await store.recent_completions(60, 10) == []  # not runner throughput
    with pytest.raises(JobNotCancellableError):
        await store.cancel(done.id)
    store_clock.advance(PAST_SHORT)
    assert await store.purge_finished(older_than_s=SHORT) == 1  # the job TTL applies
    with pytest.raises(JobNotFoundError):
        await store.get(done.id)


async def test_delete_only_ended_and_only_the_tenants(store: JobStore, backend: Backend) -> None:
    keyed, _ = await store.create_idempotent({"k": 1}, request_id=None, key="the-key", ttl_s=3600)
    live = await store.create({"prompt": "x"}, request_id=None, tenant="key:a")
    mine = await store.create_finished({"kind": "response"}, request_id=None, result={}, tenant="key:a")
    with pytest.raises(JobNotFoundError):
        await store.delete(mine.id, tenant="key:b")
    with pytest.raises(JobNotFoundError):
        await store.delete("missing")
    with pytest.raises(JobNotCancellableError):
        await store.delete(live.id, tenant="key:a")
    assert (await store.delete(mine.id, tenant="key:a")).id == mine.id
    with pytest.raises(JobNotFoundError):
        await store.get(mine.id)
    with pytest.raises(JobNotFoundError):
        await store.delete(mine.id, tenant="key:a")
    await store.cancel(keyed.id)
    assert (await store.delete(keyed.id)).state is JobState.CANCELLED  # None: any tenant's (admins)
    assert backend.idempotency_keys() == []  # its Idempotency-Key went with it
    assert [j.id for j in await store.list()] == [live.id]
    assert await store.count(JobState.SUCCEEDED) == 0 and await store.count(JobState.CANCELLED) == 0
