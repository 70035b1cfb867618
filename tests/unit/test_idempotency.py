"""Idempotency-Key support in the job store (``create_idempotent``), against SQLite and Redis alike
(``backend`` in tests/unit/conftest.py)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.unit.conftest import SUBPROCESS_STORE, Backend, OpenStore, StoreClock
from textgen.errors import IdempotencyConflictError, InvalidRequestError
from textgen.jobs.store import JobState, JobStore, request_fingerprint, validate_idempotency_key

REPO_ROOT = Path(__file__).resolve().parents[2]
TTL = 3600.0
BODY: dict[str, Any] = {"prompt": "hello", "max_new_tokens": 8, "sampling": {"temperature": 0.5, "top_k": 4}}


async def test_same_key_same_body_returns_same_job(store: JobStore) -> None:
    job, created = await store.create_idempotent(BODY, request_id="r1", key="k-1", ttl_s=TTL, callback_url="https://x")
    assert created and job.state is JobState.QUEUED and job.request == BODY and job.request_id == "r1"
    assert await store.get(job.id) == job
    reordered = {"sampling": {"top_k": 4, "temperature": 0.5}, "max_new_tokens": 8, "prompt": "hello"}
    again, created_again = await store.create_idempotent(reordered, request_id="r2", key="k-1", ttl_s=TTL)
    assert not created_again and again == job  # the original job, request_id and callback included
    assert await store.count(JobState.QUEUED) == 1
    assert isinstance(store, JobStore)


async def test_replay_returns_current_state(store: JobStore) -> None:
    job, _ = await store.create_idempotent(BODY, request_id=None, key="k", ttl_s=TTL)
    claimed = await store.claim_next("w1", 30.0)
    assert claimed is not None and claimed.id == job.id
    await store.finish(job.id, "w1", JobState.SUCCEEDED, result={"text": "hi"})
    again, created = await store.create_idempotent(BODY, request_id=None, key="k", ttl_s=TTL)
    assert not created and again.id == job.id and again.state is JobState.SUCCEEDED and again.result == {"text": "hi"}


async def test_same_key_different_body_conflicts(store: JobStore) -> None:
    await store.create_idempotent(BODY, request_id=None, key="k", ttl_s=TTL)
    with pytest.raises(IdempotencyConflictError) as info:
        await store.create_idempotent({**BODY, "prompt": "other"}, request_id=None, key="k", ttl_s=TTL)
    assert info.value.status_code == 409
    assert await store.count(JobState.QUEUED) == 1


async def test_different_key_new_job(store: JobStore) -> None:
    a, created_a = await store.create_idempotent(BODY, request_id=None, key="a", ttl_s=TTL)
    b, created_b = await store.create_idempotent(BODY, request_id=None, key="b", ttl_s=TTL)
    assert created_a and created_b and a.id != b.id


async def test_keys_with_odd_characters(store: JobStore, backend: Backend) -> None:
    keys = ["with space ~!@#$%^&*()", "a:b:c", "x" * 255, "*", "[a-z]?"]
    jobs = [(await store.create_idempotent(BODY, request_id=None, key=k, ttl_s=TTL))[0] for k in keys]
    assert len({j.id for j in jobs}) == len(keys)
    for key, job in zip(keys, jobs, strict=True):
        assert (await store.create_idempotent(BODY, request_id=None, key=key, ttl_s=TTL))[0].id == job.id
    assert backend.idempotency_keys() == sorted(f"anonymous {key}" for key in keys)


async def test_plain_create_unaffected_by_keys(store: JobStore) -> None:
    keyed, _ = await store.create_idempotent(BODY, request_id=None, key="k", ttl_s=TTL)
    plain = await store.create(BODY, request_id=None)
    assert plain.id != keyed.id and await store.count(JobState.QUEUED) == 2


async def test_expired_key_makes_new_job(store: JobStore, store_clock: StoreClock) -> None:
    first, _ = await store.create_idempotent(BODY, request_id=None, key="k", ttl_s=0.05)
    store_clock.advance(0.1)
    second, created = await store.create_idempotent(BODY, request_id=None, key="k", ttl_s=0.05)
    assert created and second.id != first.id
    # the key now points at the new job; an expired key also frees it for a different body
    again, created_again = await store.create_idempotent(BODY, request_id=None, key="k", ttl_s=TTL)
    assert not created_again and again.id == second.id
    store_clock.advance(0.1)
    third, created_third = await store.create_idempotent({"prompt": "new"}, request_id=None, key="k", ttl_s=0.05)
    assert created_third and third.id not in (first.id, second.id)


async def test_ttl_is_applied_at_lookup(store: JobStore, store_clock: StoreClock) -> None:
    first, _ = await store.create_idempotent(BODY, request_id=None, key="k", ttl_s=TTL)
    store_clock.advance(0.1)
    # the same record, looked up with a shorter TTL than it was made with, has expired
    second, created = await store.create_idempotent({"other": 1}, request_id=None, key="k", ttl_s=0.05)
    assert created and second.id != first.id


async def test_purged_job_treated_as_expired(store: JobStore, backend: Backend, store_clock: StoreClock) -> None:
    job, _ = await store.create_idempotent(BODY, request_id=None, key="k", ttl_s=TTL)
    await store.cancel(job.id)
    store_clock.advance(0.02)
    assert await store.purge_finished(older_than_s=0.01) == 1
    assert backend.idempotency_keys() == []  # record purged with its job
    again, created = await store.create_idempotent({"other": 1}, request_id=None, key="k", ttl_s=TTL)
    assert created and again.id != job.id


async def test_purge_keeps_record_repointed_at_a_live_job(
    store: JobStore, backend: Backend, store_clock: StoreClock
) -> None:
    old, _ = await store.create_idempotent(BODY, request_id=None, key="k", ttl_s=0.05)
    await store.cancel(old.id)
    store_clock.advance(0.1)
    new, created = await store.create_idempotent(BODY, request_id=None, key="k", ttl_s=0.05)
    assert created
    assert await store.purge_finished(older_than_s=0.05) == 1  # the old job
    assert backend.idempotency_keys() == ["anonymous k"]
    again, created_again = await store.create_idempotent(BODY, request_id=None, key="k", ttl_s=TTL)
    assert not created_again and again.id == new.id


async def test_dangling_record_is_replaced(store: JobStore, backend: Backend) -> None:
    job, _ = await store.create_idempotent(BODY, request_id=None, key="k", ttl_s=TTL)
    backend.delete_job(job.id)
    again, created = await store.create_idempotent({"different": True}, request_id=None, key="k", ttl_s=TTL)
    assert created and again.id != job.id


async def test_purge_idempotency(store: JobStore, backend: Backend, store_clock: StoreClock) -> None:
    await store.create_idempotent(BODY, request_id=None, key="old", ttl_s=TTL)
    await store.create_idempotent(BODY, request_id=None, key="old*2", ttl_s=TTL)
    store_clock.advance(0.05)
    await store.create_idempotent(BODY, request_id=None, key="new", ttl_s=TTL)
    assert await store.purge_idempotency(older_than_s=0.03) == 2
    assert backend.idempotency_keys() == ["anonymous new"]
    assert await store.purge_idempotency(older_than_s=0.03) == 0
    assert await store.count(JobState.QUEUED) == 3  # jobs are left alone


async def test_concurrent_same_key_two_stores(store: JobStore, open_store: OpenStore) -> None:
    stores = [store, await open_store()]
    results = await asyncio.gather(
        *(stores[i % 2].create_idempotent(BODY, request_id=f"r{i}", key="same", ttl_s=TTL) for i in range(10))
    )
    assert sum(created for _, created in results) == 1
    assert len({job.id for job, _ in results}) == 1
    assert len(await store.list(limit=100)) == 1


_CREATOR = SUBPROCESS_STORE + textwrap.dedent(
    """
    import asyncio, sys

    async def main() -> None:
        s = make_store(*sys.argv[1:4])
        await s.open()
        for i in range(20):
            job, created = await s.create_idempotent({"n": i}, request_id=None, key=f"key-{i}", ttl_s=60)
            sys.stdout.write(f"{job.id} {int(created)}\\n")
        await s.close()

    asyncio.run(main())
    """
)


async def test_same_keys_three_processes(store: JobStore, backend: Backend) -> None:
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", _CREATOR, *backend.argv(), cwd=REPO_ROOT, stdout=subprocess.PIPE
        )
        for _ in range(3)
    ]
    outs = [await p.communicate() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0]
    lines = [line.split() for out, _ in outs for line in out.decode().splitlines()]
    assert len(lines) == 60
    assert len({job_id for job_id, _ in lines}) == 20  # one job per key across all processes
    assert sum(int(created) for _, created in lines) == 20
    assert len(await store.list(limit=100)) == 20


# --- key validation and fingerprints -----------------------------------------------------------------


@pytest.mark.parametrize("key", ["a", "x" * 255, "550e8400-e29b-41d4-a716-446655440000", "with space ~!@#$%^&*()"])
def test_valid_keys(key: str) -> None:
    assert validate_idempotency_key(key) == key


@pytest.mark.parametrize("key", ["", "x" * 256, "tab\there", "new\nline", "trailing\n", "caf\u00e9", "\x7f", "\x00"])
async def test_invalid_keys_rejected(store: JobStore, key: str) -> None:
    with pytest.raises(InvalidRequestError, match="Idempotency-Key") as info:
        await store.create_idempotent(BODY, request_id=None, key=key, ttl_s=TTL)
    assert info.value.status_code == 400
    assert await store.count(JobState.QUEUED) == 0


async def test_bad_ttl_rejected(store: JobStore) -> None:
    with pytest.raises(ValueError, match="ttl_s"):
        await store.create_idempotent(BODY, request_id=None, key="k", ttl_s=0)


def test_fingerprint_canonical() -> None:
    assert request_fingerprint({"a": 1, "b": [1, 2]}) == request_fingerprint({"b": [1, 2], "a": 1})
    assert request_fingerprint({"a": 1}) != request_fingerprint({"a": 2})
    assert len(request_fingerprint({})) == 64
