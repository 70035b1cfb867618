"""Job ownership in the store contract, for both backends: a tenant sees, lists and cancels only its own
jobs (JobNotFoundError for another's, as for an unknown id), Idempotency-Keys are per tenant, and a
tenant of None (admins, the job runner) sees everything. Plus the SQLite migration of older files."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from textgen.access import ANONYMOUS_OWNER
from textgen.errors import IdempotencyConflictError, JobNotCancellableError, JobNotFoundError
from textgen.jobs.sqlite_store import SQLiteJobStore
from textgen.jobs.store import JobState, JobStore

ALICE = "key:aaaaaaaaaaaaaaaa"
BOB = "key:bbbbbbbbbbbbbbbb"
BODY = {"prompt": "The future of AI is", "max_length": 20}
TTL = 3600.0


async def test_a_job_belongs_to_its_creator(store: JobStore) -> None:
    job = await store.create(BODY, request_id="r1", tenant=ALICE, reservation="1:5:abc")
    assert job.tenant == ALICE
    stored = await store.get(job.id, tenant=ALICE)
    assert (stored.tenant, stored.reservation) == (ALICE, "1:5:abc")
    assert (await store.get(job.id)).id == job.id  # tenant None: anyone's (admins, the runner)
    with pytest.raises(JobNotFoundError):
        await store.get(job.id, tenant=BOB)
    anonymous = await store.create(BODY, request_id=None)
    assert (await store.get(anonymous.id)).tenant == ANONYMOUS_OWNER
    with pytest.raises(JobNotFoundError):
        await store.get(anonymous.id, tenant=ALICE)


async def test_lists_show_only_the_tenants_jobs(store: JobStore) -> None:
    alice_jobs = [await store.create(BODY, request_id=None, tenant=ALICE) for _ in range(3)]
    bob_jobs = [await store.create(BODY, request_id=None, tenant=BOB) for _ in range(2)]
    await store.cancel(alice_jobs[0].id, tenant=ALICE)
    assert [j.id for j in await store.list(tenant=ALICE)] == [j.id for j in reversed(alice_jobs)]
    assert [j.id for j in await store.list(tenant=BOB)] == [j.id for j in reversed(bob_jobs)]
    assert [j.id for j in await store.list(tenant=ALICE, limit=2)] == [alice_jobs[2].id, alice_jobs[1].id]
    assert [j.id for j in await store.list(tenant=ALICE, state=JobState.CANCELLED)] == [alice_jobs[0].id]
    assert await store.list(tenant=BOB, state=JobState.CANCELLED) == []
    assert await store.list(tenant="key:nobody") == []
    assert len(await store.list(limit=100)) == 5  # everyone's


async def test_another_tenants_job_cannot_be_cancelled(store: JobStore) -> None:
    job = await store.create(BODY, request_id=None, tenant=ALICE)
    with pytest.raises(JobNotFoundError):
        await store.cancel(job.id, tenant=BOB)
    assert (await store.get(job.id)).state is JobState.QUEUED  # untouched
    cancelled = await store.cancel(job.id, tenant=ALICE)
    assert cancelled.state is JobState.CANCELLED
    with pytest.raises(JobNotFoundError):  # ended: still a 404 for Bob, not a 409 that confirms the id
        await store.cancel(job.id, tenant=BOB)
    with pytest.raises(JobNotCancellableError):
        await store.cancel(job.id, tenant=ALICE)


async def test_an_admin_cancels_anyones_job(store: JobStore) -> None:
    job = await store.create(BODY, request_id=None, tenant=ALICE)
    assert (await store.cancel(job.id)).state is JobState.CANCELLED


async def test_idempotency_keys_are_per_tenant(store: JobStore) -> None:
    alice, created = await store.create_idempotent(BODY, request_id=None, key="order-1", ttl_s=TTL, tenant=ALICE)
    assert created
    # Bob's same key, same body: his own new job, not Alice's.
    bob, created = await store.create_idempotent(BODY, request_id=None, key="order-1", ttl_s=TTL, tenant=BOB)
    assert created and bob.id != alice.id and bob.tenant == BOB
    # Bob's same key, another body: his own conflict only, never a 409 because of Alice's key.
    other_body = {**BODY, "prompt": "Something else"}
    carol, created = await store.create_idempotent(
        other_body, request_id=None, key="order-1", ttl_s=TTL, tenant="key:cccccccccccccccc"
    )
    assert created
    with pytest.raises(IdempotencyConflictError):
        await store.create_idempotent(other_body, request_id=None, key="order-1", ttl_s=TTL, tenant=BOB)
    replay, created = await store.create_idempotent(BODY, request_id=None, key="order-1", ttl_s=TTL, tenant=ALICE)
    assert not created and replay.id == alice.id
    assert carol.id not in {alice.id, bob.id}


async def test_purged_jobs_leave_the_tenants_list(store: JobStore) -> None:
    job = await store.create(BODY, request_id=None, tenant=ALICE)
    await store.cancel(job.id)
    assert await store.purge_finished(-1.0) == 1
    assert await store.list(tenant=ALICE) == []


def _old_schema_file(path: Path) -> None:
    """A jobs file as the version before owners wrote it: no tenant column, unscoped idempotency keys."""
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute(
            "CREATE TABLE jobs (id TEXT PRIMARY KEY, request TEXT NOT NULL, state TEXT NOT NULL, request_id TEXT, "
            "result TEXT, error TEXT, created_at REAL NOT NULL, started_at REAL, finished_at REAL, "
            "attempts INTEGER NOT NULL DEFAULT 0, owner TEXT)"
        )
        conn.execute(
            "CREATE TABLE idempotency_keys (key TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, job_id TEXT NOT NULL, "
            "created_at REAL NOT NULL)"
        )


async def test_sqlite_migration_gives_old_jobs_and_keys_to_the_anonymous_owner(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    _old_schema_file(path)
    # Make the old job and key with today's code on the old layout's data, then strip them back.
    fresh = SQLiteJobStore(tmp_path / "fresh.db")
    await fresh.open()
    made, _ = await fresh.create_idempotent(BODY, request_id=None, key="legacy", ttl_s=TTL)
    await fresh.close()
    with closing(sqlite3.connect(tmp_path / "fresh.db")) as src, closing(sqlite3.connect(path)) as dst, dst:
        row = src.execute(
            "SELECT id, request, state, request_id, created_at FROM jobs WHERE id = ?", (made.id,)
        ).fetchone()
        dst.execute("INSERT INTO jobs (id, request, state, request_id, created_at) VALUES (?, ?, ?, ?, ?)", row)
        fingerprint, created_at = src.execute("SELECT fingerprint, created_at FROM idempotency_keys").fetchone()
        dst.execute("INSERT INTO idempotency_keys VALUES ('legacy', ?, ?, ?)", (fingerprint, made.id, created_at))

    store = SQLiteJobStore(path)
    await store.open()
    try:
        assert (await store.get(made.id, tenant=ANONYMOUS_OWNER)).tenant == ANONYMOUS_OWNER
        with pytest.raises(JobNotFoundError):
            await store.get(made.id, tenant=ALICE)
        replay, created = await store.create_idempotent(BODY, request_id=None, key="legacy", ttl_s=TTL)
        assert not created and replay.id == made.id
        theirs, created = await store.create_idempotent(BODY, request_id=None, key="legacy", ttl_s=TTL, tenant=ALICE)
        assert created and theirs.id != made.id
    finally:
        await store.close()
    # Opening again migrates nothing twice (the key is not prefixed again).
    again = SQLiteJobStore(path)
    await again.open()
    try:
        replay, created = await again.create_idempotent(BODY, request_id=None, key="legacy", ttl_s=TTL)
        assert not created and replay.id == made.id
    finally:
        await again.close()

