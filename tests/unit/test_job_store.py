"""Unit tests for the durable job store (``textgen.jobs.store``), SQLite implementation."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from textgen.errors import ConfigError, JobNotCancellableError, JobNotFoundError
from textgen.jobs import store as store_mod
from textgen.jobs.store import (
    TERMINAL_STATES,
    Job,
    JobState,
    JobStore,
    SQLiteJobStore,
    job_store_from_url,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteJobStore]:
    s = SQLiteJobStore(tmp_path / "jobs.db")
    await s.open()
    yield s
    await s.close()


async def _make(store: SQLiteJobStore, n: int) -> list[Job]:
    return [await store.create({"prompt": f"p{i}", "n": i}, request_id=f"req-{i}") for i in range(n)]


# --- state machine -----------------------------------------------------------------------------------


async def test_create_get_roundtrip(store: SQLiteJobStore) -> None:
    job = await store.create({"prompt": "hi", "max_tokens": 5, "nested": {"a": [1, 2]}}, request_id="r1")
    assert len(job.id) == 32 and job.state is JobState.QUEUED
    assert job.attempts == 0 and job.owner is None and job.started_at is None and job.finished_at is None
    assert job.created_at > 0
    assert await store.get(job.id) == job
    assert isinstance(store, JobStore)


async def test_claim_then_finish_succeeded(store: SQLiteJobStore) -> None:
    job = await store.create({"prompt": "x"}, request_id=None)
    claimed = await store.claim_next("w1")
    assert claimed is not None and claimed.id == job.id
    assert claimed.state is JobState.RUNNING and claimed.owner == "w1" and claimed.attempts == 1
    assert claimed.started_at is not None and claimed.started_at >= job.created_at
    assert await store.claim_next("w1") is None

    assert await store.finish(job.id, "w1", JobState.SUCCEEDED, result={"text": "ok"})
    done = await store.get(job.id)
    assert done.state is JobState.SUCCEEDED and done.result == {"text": "ok"} and done.error is None
    assert done.finished_at is not None and done.finished_at >= claimed.started_at
    # A second finish (e.g. a duplicate runner) does not take effect.
    assert not await store.finish(job.id, "w1", JobState.FAILED, error="late")
    assert (await store.get(job.id)).state is JobState.SUCCEEDED


async def test_finish_failed_with_error(store: SQLiteJobStore) -> None:
    job = await store.create({"prompt": "x"}, request_id="r")
    await store.claim_next("w1")
    assert await store.finish(job.id, "w1", JobState.FAILED, error="boom")
    failed = await store.get(job.id)
    assert failed.state is JobState.FAILED and failed.error == "boom" and failed.result is None


async def test_finish_rejects_non_final_state(store: SQLiteJobStore) -> None:
    job = await store.create({}, request_id=None)
    await store.claim_next("w1")
    for bad in (JobState.QUEUED, JobState.RUNNING, JobState.CANCELLED):
        with pytest.raises(ValueError):
            await store.finish(job.id, "w1", bad)
    assert (await store.get(job.id)).state is JobState.RUNNING


async def test_finish_wrong_owner_or_not_running(store: SQLiteJobStore) -> None:
    job = await store.create({}, request_id=None)
    assert not await store.finish(job.id, "w1", JobState.SUCCEEDED)  # still queued
    await store.claim_next("w1")
    assert not await store.finish(job.id, "w2", JobState.SUCCEEDED, result={})
    assert not await store.finish("no-such-job", "w1", JobState.SUCCEEDED)
    still = await store.get(job.id)
    assert still.state is JobState.RUNNING and still.owner == "w1" and still.finished_at is None


async def test_cancel_queued(store: SQLiteJobStore) -> None:
    job = await store.create({}, request_id=None)
    cancelled = await store.cancel(job.id)
    assert cancelled.state is JobState.CANCELLED and cancelled.finished_at is not None
    assert await store.get(job.id) == cancelled
    assert await store.claim_next("w1") is None


async def test_cancel_running_then_finish_is_ignored(store: SQLiteJobStore) -> None:
    job = await store.create({}, request_id=None)
    await store.claim_next("w1")
    cancelled = await store.cancel(job.id)
    assert cancelled.state is JobState.CANCELLED and cancelled.owner == "w1"
    assert not await store.finish(job.id, "w1", JobState.SUCCEEDED, result={"text": "too late"})
    after = await store.get(job.id)
    assert after.state is JobState.CANCELLED and after.result is None


async def test_cancel_terminal_and_unknown(store: SQLiteJobStore) -> None:
    job = await store.create({}, request_id=None)
    await store.claim_next("w1")
    await store.finish(job.id, "w1", JobState.SUCCEEDED, result={})
    with pytest.raises(JobNotCancellableError):
        await store.cancel(job.id)
    other = await store.create({}, request_id=None)
    await store.cancel(other.id)
    with pytest.raises(JobNotCancellableError):
        await store.cancel(other.id)
    with pytest.raises(JobNotFoundError):
        await store.cancel("missing")


async def test_get_unknown(store: SQLiteJobStore) -> None:
    with pytest.raises(JobNotFoundError):
        await store.get("0" * 32)


def test_terminal_states() -> None:
    assert frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}) == TERMINAL_STATES
    assert JobState.RUNNING == "running"


# --- claiming ----------------------------------------------------------------------------------------


async def test_claim_oldest_first(store: SQLiteJobStore) -> None:
    jobs = await _make(store, 5)
    claimed = [await store.claim_next("w") for _ in range(5)]
    assert [j.id for j in claimed if j] == [j.id for j in jobs]
    assert await store.claim_next("w") is None


async def test_claim_once_two_stores_concurrently(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    a, b = SQLiteJobStore(path), SQLiteJobStore(path)
    await a.open()
    await b.open()
    try:
        created = {j.id for j in await _make(a, 20)}
        calls = [s.claim_next(f"owner-{i}") for i in range(30) for s in (a, b)]
        results = await asyncio.gather(*calls)
        got = [j.id for j in results if j is not None]
        assert len(got) == len(set(got)) == 20
        assert set(got) == created
        assert await a.count(JobState.RUNNING) == 20
        assert await b.count(JobState.QUEUED) == 0
        assert all(j.attempts == 1 for j in await a.list(limit=100))
    finally:
        await a.close()
        await b.close()


_CLAIMER = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from textgen.jobs.sqlite_store import SQLiteJobStore

    async def main() -> None:
        s = SQLiteJobStore(Path(sys.argv[1]))
        await s.open()
        while (job := await s.claim_next(sys.argv[2])) is not None:
            sys.stdout.write(job.id + "\\n")
        await s.close()

    asyncio.run(main())
    """
)


async def test_claim_once_two_processes(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    s = SQLiteJobStore(path)
    await s.open()
    created = {j.id for j in await _make(s, 200)}
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", _CLAIMER, str(path), f"proc-{i}", cwd=REPO_ROOT, stdout=subprocess.PIPE
        )
        for i in range(2)
    ]
    outs = [await p.communicate() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    got = [line for out, _ in outs for line in out.decode().split()]
    assert len(got) == len(set(got)) == 200 and set(got) == created
    assert await s.count(JobState.RUNNING) == 200
    await s.close()


async def test_cancelled_claim_is_handed_back(store: SQLiteJobStore) -> None:
    job = await store.create({}, request_id=None)
    store._db._lock.acquire()  # hold the worker thread so the claim lands after the caller is cancelled
    try:
        task = asyncio.create_task(store.claim_next("w1"))
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.sleep(0.05)
    finally:
        store._db._lock.release()
    with pytest.raises(asyncio.CancelledError):
        await task
    back = await store.get(job.id)
    assert back.state is JobState.QUEUED and back.owner is None and back.attempts == 0


# --- re-queueing -------------------------------------------------------------------------------------


async def test_requeue_owned(store: SQLiteJobStore) -> None:
    j1, j2, j3 = await _make(store, 3)
    await store.claim_next("a")
    await store.claim_next("a")
    await store.claim_next("b")
    assert await store.requeue_owned("a") == 2
    assert await store.requeue_owned("a") == 0
    for j in (j1, j2):
        back = await store.get(j.id)
        assert back.state is JobState.QUEUED and back.owner is None and back.started_at is None
        assert back.attempts == 1
    assert (await store.get(j3.id)).owner == "b"
    reclaimed = await store.claim_next("c")
    assert reclaimed is not None and reclaimed.id == j1.id and reclaimed.attempts == 2


async def test_requeue_orphaned(store: SQLiteJobStore) -> None:
    dead1, dead2, alive, queued = await _make(store, 4)
    for owner in ("dead", "dead", "alive"):
        await store.claim_next(owner)
    done = await store.create({}, request_id=None)
    await store.cancel(done.id)
    asked: list[str] = []

    def is_alive(owner: str) -> bool:
        asked.append(owner)
        return owner == "alive"

    assert await store.requeue_orphaned(is_alive) == 2
    assert sorted(asked) == ["alive", "dead"]
    assert (await store.get(alive.id)).state is JobState.RUNNING
    assert (await store.get(done.id)).state is JobState.CANCELLED
    requeued = await store.get(dead2.id)
    assert requeued.state is JobState.QUEUED and requeued.owner is None and requeued.attempts == 1
    assert (await store.get(queued.id)).attempts == 0
    assert await store.count(JobState.QUEUED) == 3
    first = await store.claim_next("new")
    assert first is not None and first.id == dead1.id and first.attempts == 2
    assert await store.requeue_orphaned(lambda _o: True) == 0


# --- queries -----------------------------------------------------------------------------------------


async def test_list_filter_limit_newest_first(store: SQLiteJobStore) -> None:
    jobs = await _make(store, 6)
    await store.claim_next("w")  # jobs[0] -> running
    await store.cancel(jobs[5].id)
    everything = await store.list()
    assert [j.id for j in everything] == [j.id for j in reversed(jobs)]
    assert [j.id for j in await store.list(limit=2)] == [jobs[5].id, jobs[4].id]
    queued = await store.list(state=JobState.QUEUED)
    assert [j.id for j in queued] == [jobs[4].id, jobs[3].id, jobs[2].id, jobs[1].id]
    assert [j.id for j in await store.list(state=JobState.QUEUED, limit=1)] == [jobs[4].id]
    assert [j.id for j in await store.list(state=JobState.RUNNING)] == [jobs[0].id]
    assert await store.list(state=JobState.FAILED) == []
    assert await store.list(limit=0) == []
    with pytest.raises(ValueError):
        await store.list(limit=-1)


async def test_states_and_count(store: SQLiteJobStore) -> None:
    a, b, c = await _make(store, 3)
    await store.claim_next("w")
    await store.cancel(c.id)
    got = await store.states([a.id, b.id, c.id, "missing", a.id])
    assert got == {a.id: JobState.RUNNING, b.id: JobState.QUEUED, c.id: JobState.CANCELLED}
    assert await store.states([]) == {}
    assert await store.count(JobState.QUEUED) == 1
    assert await store.count(JobState.SUCCEEDED) == 0


async def test_states_many_ids(store: SQLiteJobStore) -> None:
    jobs = await _make(store, 3)
    ids = [j.id for j in jobs] + [f"missing-{i}" for i in range(1200)]
    assert set(await store.states(ids)) == {j.id for j in jobs}


async def test_purge_finished(store: SQLiteJobStore) -> None:
    old_done, fresh_done, claimed_job, waiting = await _make(store, 4)
    for j in (old_done, fresh_done):
        claimed = await store.claim_next("w")
        assert claimed is not None and claimed.id == j.id
        await store.finish(j.id, "w", JobState.SUCCEEDED, result={})
    await store.claim_next("w")  # claimed_job -> running
    old_cancelled = await store.create({}, request_id=None)
    await store.cancel(old_cancelled.id)
    # Age two terminal jobs by an hour, directly in the file.
    with sqlite3.connect(store.path) as raw:
        raw.execute(
            "UPDATE jobs SET finished_at = finished_at - 3600 WHERE id IN (?, ?)",
            (old_done.id, old_cancelled.id),
        )
    raw.close()
    assert await store.purge_finished(older_than_s=600) == 2
    with pytest.raises(JobNotFoundError):
        await store.get(old_done.id)
    with pytest.raises(JobNotFoundError):
        await store.get(old_cancelled.id)
    assert await store.purge_finished(older_than_s=600) == 0
    # Non-terminal jobs are never purged, however old.
    await asyncio.sleep(0.05)
    assert await store.purge_finished(older_than_s=0.01) == 1  # fresh_done
    remaining = await store.states([claimed_job.id, waiting.id])
    assert remaining == {claimed_job.id: JobState.RUNNING, waiting.id: JobState.QUEUED}


# --- lifecycle & durability --------------------------------------------------------------------------


async def test_durable_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "dir" / "jobs.db"  # parent directories are created
    s1 = SQLiteJobStore(path)
    await s1.open()
    job = await s1.create({"prompt": "keep me", "temperature": 0.5}, request_id="r-9")
    claimed = await s1.claim_next("p1")
    await s1.close()
    await s1.close()  # idempotent

    s2 = SQLiteJobStore(path)
    await s2.open()
    try:
        again = await s2.get(job.id)
        assert again == claimed
        assert again.request == {"prompt": "keep me", "temperature": 0.5} and again.request_id == "r-9"
        assert await s2.requeue_orphaned(lambda owner: owner != "p1") == 1
        assert (await s2.claim_next("p2")) is not None
    finally:
        await s2.close()


async def test_use_before_open_raises(tmp_path: Path) -> None:
    s = SQLiteJobStore(tmp_path / "jobs.db")
    with pytest.raises(RuntimeError, match="not open"):
        await s.get("x")


async def test_open_is_wal(store: SQLiteJobStore) -> None:
    with sqlite3.connect(store.path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    raw.close()


async def test_open_parent_is_a_file(tmp_path: Path) -> None:
    # Tests run as root, where chmod does not stop writes; a parent that is a regular file
    # makes directory creation fail instead.
    blocker = tmp_path / "afile"
    blocker.write_text("not a directory")
    path = blocker / "jobs.db"
    with pytest.raises(ConfigError) as info:
        await SQLiteJobStore(path).open()
    msg = str(info.value)
    assert f"Cannot use job store at {path}" in msg and "TEXTGEN_JOB_STORE" in msg


async def test_open_path_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Cannot use job store"):
        await SQLiteJobStore(tmp_path).open()


async def test_open_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ConfigError, match="Cannot use job store"):
        await SQLiteJobStore(path).open()


async def test_open_read_only_database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A read-only database cannot be made by chmod as root; open it read-only through SQLite instead.
    path = tmp_path / "jobs.db"
    s = SQLiteJobStore(path)
    await s.open()
    await s.close()
    real_connect = sqlite3.connect

    def read_only_connect(database: str, **kwargs: Any) -> sqlite3.Connection:
        return real_connect(f"file:{database}?mode=ro", uri=True, **kwargs)

    monkeypatch.setattr(store_mod.sqlite3, "connect", read_only_connect)
    with pytest.raises(ConfigError, match="readonly"):
        await SQLiteJobStore(path).open()


# --- URL factory -------------------------------------------------------------------------------------


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


@pytest.mark.parametrize("url", ["redis://localhost:6379/0", "rediss://user:secret@host/1"])
def test_url_redis_not_implemented(url: str) -> None:
    with pytest.raises(ConfigError, match="Redis job store is not implemented") as info:
        job_store_from_url(url)
    assert "sqlite:///" in str(info.value) and "secret" not in str(info.value)


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
