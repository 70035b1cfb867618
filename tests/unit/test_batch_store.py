"""Conformance suite of the batch store, run against SQLite and a real Redis (``backend`` fixture)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.unit.conftest import Backend
from textgen.batches.redis_store import RedisBatchStore
from textgen.batches.sqlite_store import SQLiteBatchStore
from textgen.batches.store import (
    Batch,
    BatchNotFoundError,
    BatchStatus,
    BatchStore,
    FileNotFoundInStoreError,
    FileObject,
    LineOutcome,
)


def new_store(backend: Backend) -> BatchStore:
    if backend.name == "redis":
        return RedisBatchStore(backend.target, prefix=backend.prefix)
    return SQLiteBatchStore(Path(backend.target))


@pytest_asyncio.fixture
async def store(backend: Backend) -> AsyncIterator[BatchStore]:
    opened = new_store(backend)
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
    first = FileObject("file-1", "alice", "a.jsonl", "batch", 10, 1.0, 1)
    second = FileObject("file-2", "alice", "out.jsonl", "batch_output", 20, 2.0, 2)
    other = FileObject("file-3", "bob", "b.jsonl", "batch", 30, 3.0, 3)
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


async def test_an_expired_lease_is_taken_over(store: BatchStore) -> None:
    await store.create_batch(a_batch("batch_a"))
    assert len(await store.claim_due("w1", 0.2, 8)) == 1
    await asyncio.sleep(0.3)
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
