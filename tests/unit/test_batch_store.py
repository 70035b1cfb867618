"""Conformance suite of the batch store, run against SQLite and a real Redis (``backend`` fixture)."""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import closing
from pathlib import Path

import pytest
import pytest_asyncio
import redis

from tests.support.redis import RedisServer
from tests.unit.conftest import Backend, StoreClock
from textgen.batches.redis_store import RedisBatchStore
from textgen.batches.sqlite_store import SQLiteBatchStore
from textgen.batches.store import (
    Batch,
    BatchNotFoundError,
    BatchStatus,
    BatchStore,
    FileNotFoundInStoreError,
    FileQuota,
    FileUsage,
    LineOutcome,
    StoredFile,
    file_to_json,
)


def new_store(backend: Backend, clock: Callable[[], float] | None = None) -> BatchStore:
    if backend.name == "redis":
        return RedisBatchStore(backend.target, prefix=backend.prefix, clock=clock)
    return SQLiteBatchStore(Path(backend.target), clock=clock or time.time)


@pytest_asyncio.fixture
async def store(backend: Backend, store_clock: StoreClock) -> AsyncIterator[BatchStore]:
    opened = new_store(backend, store_clock)
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


def a_batch(batch_id: str, owner: str = "alice", created_at: float | None = None) -> Batch:
    now = created_at or time.time()
    return Batch(
        id=batch_id,
        owner=owner,
        endpoint="/v1/completions",
        input_file_id="file-x",
        completion_window="24h",
        window_s=86400,
        created_at=now,
        expires_at=now + 86400,
    )


async def test_files_are_kept_listed_per_owner_and_deleted(store: BatchStore) -> None:
    first = StoredFile("file-1", "alice", "a.jsonl", "batch", 10, 1.0, 1)
    second = StoredFile("file-2", "alice", "out.jsonl", "batch_output", 20, 2.0, 2)
    other = StoredFile("file-3", "bob", "b.jsonl", "batch", 30, 3.0, 3)
    for record in (first, second, other):
        await store.put_file(record)
    assert await store.get_file("file-2") == second
    assert [f.id for f in await store.list_files("alice")] == ["file-2", "file-1"]
    assert [f.id for f in await store.list_files("alice", purpose="batch")] == ["file-1"]
    assert [f.id for f in await store.list_files(None)] == ["file-3", "file-2", "file-1"]
    assert [f.id for f in await store.list_files("alice", limit=1)] == ["file-2"]
    assert await store.delete_file("file-1")
    with pytest.raises(FileNotFoundInStoreError):
        await store.get_file("file-1")
    assert [f.id for f in await store.list_files("alice")] == ["file-2"]


async def test_batches_are_listed_newest_first_per_owner(store: BatchStore) -> None:
    for index, owner in enumerate(["alice", "bob", "alice"]):
        await store.create_batch(a_batch(f"batch_{index}", owner, created_at=100.0 + index))
    assert [b.id for b in await store.list_batches("alice")] == ["batch_2", "batch_0"]
    assert [b.id for b in await store.list_batches(None, limit=2)] == ["batch_2", "batch_1"]
    assert (await store.get_batch("batch_1")).owner == "bob"
    with pytest.raises(BatchNotFoundError):
        await store.get_batch("batch_missing")


async def test_a_batch_is_leased_to_one_worker_and_only_the_holder_writes(
    store: BatchStore, backend: Backend
) -> None:
    other = new_store(backend)
    await other.open()
    try:
        await store.create_batch(a_batch("batch_a"))
        claimed = await store.claim_due("w1", 30, 8)
        assert [b.id for b in claimed] == ["batch_a"]
        assert await other.claim_due("w2", 30, 8) == []
        moved = claimed[0].with_(status=BatchStatus.IN_PROGRESS, total=3)
        assert not await other.save(moved, "w2")
        assert await store.save(moved, "w1")
        assert (await other.get_batch("batch_a")).total == 3
        await store.release("batch_a", "w1", time.time() + 60, done=False)
        assert await other.claim_due("w2", 30, 8) == [], "not due before next_check_at"
    finally:
        await other.close()


async def test_an_expired_lease_is_taken_over(store: BatchStore, store_clock: StoreClock) -> None:
    await store.create_batch(a_batch("batch_a"))
    assert len(await store.claim_due("w1", 30, 8)) == 1
    store_clock.advance(29)
    assert await store.claim_due("w2", 30, 8) == [], "still held"
    store_clock.advance(2)
    assert [b.id for b in await store.claim_due("w2", 30, 8)] == ["batch_a"]
    assert not await store.save((await store.get_batch("batch_a")).with_(total=9), "w1")


async def test_done_batches_rest_until_a_cancel_is_asked(store: BatchStore) -> None:
    await store.create_batch(a_batch("batch_a"))
    (claimed,) = await store.claim_due("w1", 30, 8)
    assert await store.save(claimed.with_(status=BatchStatus.IN_PROGRESS), "w1")
    await store.release("batch_a", "w1", 0, done=True)
    assert await store.claim_due("w1", 30, 8) == []
    asked = await store.request_cancel("batch_a")
    assert asked.cancel_requested_at is not None
    (again,) = await store.claim_due("w1", 30, 8)
    assert again.cancel_requested_at == asked.cancel_requested_at
    assert await store.save(again.with_(total=1), "w1")  # a coordinator's save keeps the request
    assert (await store.get_batch("batch_a")).cancel_requested_at == asked.cancel_requested_at


async def test_cancel_of_an_ended_batch_records_nothing(store: BatchStore) -> None:
    await store.create_batch(a_batch("batch_a"))
    (claimed,) = await store.claim_due("w1", 30, 8)
    assert await store.save(claimed.with_(status=BatchStatus.COMPLETED), "w1")
    await store.release("batch_a", "w1", 0, done=True)
    assert (await store.request_cancel("batch_a")).cancel_requested_at is None
    with pytest.raises(BatchNotFoundError):
        await store.request_cancel("batch_missing")


async def test_lines_duplicates_outcomes_once_and_paging(store: BatchStore) -> None:
    duplicates = await store.add_lines("b", [(1, "x"), (2, "y"), (4, "x")])
    assert duplicates == [4]
    assert await store.add_lines("b", [(5, "y"), (6, "z")]) == [5]
    assert await store.add_lines("b", [(2, "y"), (6, "z")]) == [], "the same pair again (a resumed step) is fine"
    await store.set_jobs("b", [(1, "job-1"), (2, "job-2"), (6, "job-6")])
    assert await store.open_lines("b", 0, 10) == [(1, "job-1"), (2, "job-2"), (6, "job-6")]
    assert await store.open_lines("b", 1, 1) == [(2, "job-2")]
    await store.set_outcomes("b", [(1, LineOutcome.SUCCEEDED), (6, LineOutcome.FAILED)])
    await store.set_outcomes("b", [(1, LineOutcome.FAILED)])  # a second outcome for line 1 is ignored
    assert await store.outcome_counts("b") == {LineOutcome.SUCCEEDED: 1, LineOutcome.FAILED: 1}
    assert await store.open_lines("b", 0, 10) == [(2, "job-2")]
    await store.set_jobs("b", [(1, "job-1")])  # resubmitting a line that already ended does not reopen it
    assert await store.open_lines("b", 0, 10) == [(2, "job-2")]
    lines = await store.lines("b", 0, 10)
    assert [(line.number, line.custom_id, line.job_id, line.outcome) for line in lines] == [
        (1, "x", "job-1", LineOutcome.SUCCEEDED),
        (2, "y", "job-2", None),
        (6, "z", "job-6", LineOutcome.FAILED),
    ]
    assert [line.number for line in await store.lines("b", 2, 10)] == [6]
    await store.clear_lines("b")
    assert await store.lines("b", 0, 10) == [] and await store.outcome_counts("b") == {}
    assert await store.add_lines("b", [(1, "x")]) == []


# ----- quota and expiry -----------------------------------------------------------------------------------


def a_file(file_id: str, owner: str = "alice", size: int = 10, expires_at: float | None = None) -> StoredFile:
    return StoredFile(file_id, owner, f"{file_id}.jsonl", "batch", size, 1.0, 1, expires_at)


async def test_usage_counts_each_owners_files_and_bytes_through_put_replace_and_delete(store: BatchStore) -> None:
    assert await store.file_usage("alice") == FileUsage(0, 0)
    await store.put_file(a_file("file-1", size=10))
    await store.put_file(a_file("file-2", size=20))
    await store.put_file(a_file("file-3", owner="bob", size=5))
    assert await store.file_usage("alice") == FileUsage(2, 30)
    await store.put_file(a_file("file-2", size=25))  # a finalisation written again replaces, not adds
    assert await store.file_usage("alice") == FileUsage(2, 35)
    assert await store.delete_file("file-1")
    assert not await store.delete_file("file-1")  # already gone (another process's sweep): no double count
    assert await store.file_usage("alice") == FileUsage(1, 25)
    assert await store.file_usage("bob") == FileUsage(1, 5)


async def test_add_file_refuses_past_the_quota_and_writes_nothing(store: BatchStore) -> None:
    quota = FileQuota(max_files=2, max_bytes=100)
    assert await store.add_file(a_file("file-1", size=60), quota)
    assert not await store.add_file(a_file("file-2", size=41), quota)  # 101 bytes
    assert await store.add_file(a_file("file-2", size=40), quota)  # exactly 100
    assert not await store.add_file(a_file("file-3", size=0), quota)  # a third file
    with pytest.raises(FileNotFoundInStoreError):
        await store.get_file("file-3")
    assert await store.file_usage("alice") == FileUsage(2, 100)
    assert await store.add_file(a_file("file-9", owner="bob", size=100), quota)  # per owner
    assert await store.add_file(a_file("file-x", size=10**9), FileQuota())  # 0 = no limit


async def test_racing_uploads_cannot_both_take_the_last_room(store: BatchStore) -> None:
    quota = FileQuota(max_files=0, max_bytes=100)
    results = await asyncio.gather(*(store.add_file(a_file(f"file-{i}", size=60), quota) for i in range(6)))
    assert sum(results) == 1
    assert await store.file_usage("alice") == FileUsage(1, 60)


async def test_expired_files_come_back_soonest_first_until_deleted(store: BatchStore) -> None:
    await store.put_file(a_file("file-late", expires_at=300.0))
    await store.put_file(a_file("file-soon", expires_at=100.0))
    await store.put_file(a_file("file-never"))
    await store.put_file(a_file("file-bob", owner="bob", expires_at=200.0))
    assert [f.id for f in await store.expired_files(99.0, 10)] == []
    assert [f.id for f in await store.expired_files(250.0, 10)] == ["file-soon", "file-bob"]
    assert [f.id for f in await store.expired_files(1e12, 1)] == ["file-soon"]
    assert (await store.get_file("file-late")).expires_at == 300.0
    await store.delete_file("file-soon")
    assert [f.id for f in await store.expired_files(1e12, 10)] == ["file-bob", "file-late"]
    await store.put_file(a_file("file-late"))  # replaced without an expiry: no longer expires
    assert [f.id for f in await store.expired_files(1e12, 10)] == ["file-bob"]


async def test_files_stored_before_quotas_are_counted(backend: Backend, store: BatchStore) -> None:
    """A store written by the previous version (no size column / no usage counters) still counts its files."""
    old = a_file("file-old", size=77)
    if backend.name == "redis":
        import redis

        raw = redis.Redis.from_url(backend.target)
        raw.set(f"{backend.prefix}:bfile:file-old", file_to_json(old).replace(',"expires_at":null', ""))
        raw.zadd(f"{backend.prefix}:bfiles", {"file-old": 1.0})
        raw.zadd(f"{backend.prefix}:bfiles:alice", {"file-old": 1.0})
        raw.delete(f"{backend.prefix}:bfusage-built", f"{backend.prefix}:bfusage:alice")
    else:
        with closing(sqlite3.connect(backend.target)) as conn, conn:
            # The file as schema version 1 of the batch tables left it (textgen.storage.migrations).
            conn.execute("UPDATE schema_versions SET version = 1 WHERE component = 'batches'")
            conn.execute("DROP TABLE batch_files")
            conn.execute(
                "CREATE TABLE batch_files (id TEXT PRIMARY KEY, owner TEXT NOT NULL, purpose TEXT NOT NULL, "
                "created_at REAL NOT NULL, data TEXT NOT NULL)"
            )
            conn.execute(
                "INSERT INTO batch_files VALUES (?, ?, ?, ?, ?)",
                (old.id, old.owner, old.purpose, old.created_at, file_to_json(old).replace(',"expires_at":null', "")),
            )
    reopened = new_store(backend)
    await reopened.open()
    try:
        assert await reopened.get_file("file-old") == old
        assert await reopened.file_usage("alice") == FileUsage(1, 77)
        assert await reopened.delete_file("file-old")
        assert await reopened.file_usage("alice") == FileUsage(0, 0)
    finally:
        await reopened.close()


async def test_redis_leases_run_on_the_servers_clock_not_the_clients(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica whose clock runs an hour behind must not write leases that have already run out (another
    replica would take the batch over mid-step): leases are on the Redis server's clock (TIME)."""
    url, prefix = redis_server.url(0), f"test-{uuid.uuid4().hex[:12]}"
    behind, on_time = RedisBatchStore(url, prefix=prefix), RedisBatchStore(url, prefix=prefix)
    await behind.open()
    await on_time.open()
    try:
        await on_time.create_batch(a_batch("batch_a"))
        real = time.time
        monkeypatch.setattr("textgen.batches.redis_store.time.time", lambda: real() - 3600)
        assert [b.id for b in await behind.claim_due("w1", 30, 8)] == ["batch_a"]
        monkeypatch.setattr("textgen.batches.redis_store.time.time", real)
        assert await on_time.claim_due("w2", 30, 8) == [], "the lease runs 30 s on the server's clock"
        with closing(redis.Redis.from_url(url, decode_responses=True)) as raw:
            seconds, micros = raw.time()
            lease_until = float(raw.hget(f"{prefix}:batch:batch_a", "lease_until") or 0)
        assert 25 < lease_until - (seconds + micros / 1e6) <= 30
    finally:
        await behind.close()
        await on_time.close()
        with closing(redis.Redis.from_url(url)) as raw:
            keys = list(raw.scan_iter(match=f"{prefix}:*"))
            if keys:
                raw.delete(*keys)
