"""Store errors of the environment (disk full, read-only, locked, Redis out of memory) are one clear
answer per request (507 or 503 + Retry-After, naming the cause and the fix), logged once per change of
condition rather than as a traceback per request; service resumes by itself once the cause is gone."""

from __future__ import annotations

import contextlib
import logging
import math
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_store_outage import textgen_logs
from tests.support.redis import start_redis
from tests.support.waiting import wait_until
from textgen.batches.redis_store import RedisBatchStore
from textgen.batches.store import Batch
from textgen.errors import InsufficientStorageError
from textgen.jobs.redis_store import RedisJobStore
from textgen.jobs.sqlite_store import SQLiteJobStore


class FailingConnection:
    """A sqlite3 connection whose statements fail with ``error`` while ``armed`` (an injected full disk)."""

    def __init__(self, real: sqlite3.Connection) -> None:
        self.real = real
        self.error: str | None = None
        self.only: tuple[str, ...] = ()  # statements that fail (by their first word); empty: all of them
        self.raised = 0  # statements refused so far

    def execute(self, sql: str, *args: Any) -> Any:
        if self.error is not None and (not self.only or sql.lstrip().upper().startswith(self.only)):
            self.raised += 1
            raise sqlite3.OperationalError(self.error)
        return self.real.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.getMessage()}")


@pytest.fixture
def storage_logs() -> Iterator[list[str]]:
    handler = _Collect()
    logger = logging.getLogger("textgen.storage")
    logger.addHandler(handler)
    previous = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield handler.lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


def inject(store: SQLiteJobStore) -> FailingConnection:
    failing = FailingConnection(store._db._conn)  # type: ignore[arg-type]
    store._db._conn = failing  # type: ignore[assignment]
    return failing


@pytest.mark.parametrize(
    ("error", "status", "cause"),
    [
        ("database or disk is full", 507, "disk is full"),
        ("attempt to write a readonly database", 507, "cannot be written"),
        ("database is locked", 503, "stayed locked"),
    ],
)
async def test_sqlite_conditions_over_http(
    error: str,
    status: int,
    cause: str,
    make_settings: Callable[..., Any],
    app_client: Any,
    storage_logs: list[str],
) -> None:
    async with app_client(make_settings(job_poll_interval_s=60.0)) as (client, app):
        failing = inject(app.state.textgen.store)
        failing.error = error
        answers = [await client.post("/generate_background", json={"prompt": "Hello"}) for _ in range(5)]
        for response in answers:
            assert response.status_code == status, response.text
            body = response.json()
            assert (cause in body["detail"] and "TEXTGEN_JOB_STORE" in body["detail"]) or status == 503
            assert body["request_id"] == response.headers["X-Request-ID"]
            assert int(response.headers["Retry-After"]) >= 1
        assert sum(cause in line for line in storage_logs) == 1, "\n".join(storage_logs)  # once, not per request
        failing.error = None
        assert (await client.post("/generate_background", json={"prompt": "Hello"})).status_code == 202
        assert any("works again" in line for line in storage_logs), storage_logs


@contextlib.contextmanager
def capped_redis(tmp_path: Path) -> Iterator[tuple[str, Callable[[bool], None]]]:
    """A private redis-server (its URL) and ``full(on)``: with ``on`` it refuses writes (maxmemory 1,
    noeviction: the "-OOM" reply), without it takes them again."""
    import redis

    server = start_redis(tmp_path / "redis")
    raw = redis.Redis.from_url(server.url(0))

    def full(on: bool) -> None:
        raw.config_set("maxmemory-policy", "noeviction")
        raw.config_set("maxmemory", "1" if on else "0")

    try:
        yield server.url(0), full
    finally:
        raw.close()
        server.stop()


async def test_redis_out_of_memory_is_a_507(tmp_path: Path, storage_logs: list[str]) -> None:
    with capped_redis(tmp_path) as (url, full):
        store = RedisJobStore(url, prefix="oom")
        await store.open()
        try:
            full(True)
            for _ in range(3):
                with pytest.raises(InsufficientStorageError) as refused:
                    await store.create({"prompt": "hi"}, request_id=None)
            assert refused.value.status_code == 507 and "out of memory" in refused.value.message
            assert "maxmemory" in refused.value.message
            assert sum("out of memory" in line for line in storage_logs) == 1, storage_logs
            full(False)
            job = await store.create({"prompt": "hi"}, request_id=None)
            assert (await store.get(job.id)).id == job.id
            assert any("works again" in line for line in storage_logs), storage_logs
        finally:
            await store.close()


def a_batch(batch_id: str) -> Batch:
    return Batch(batch_id, "alice", "/v1/completions", "file-x", "24h", 86400, 1.0, 86401.0)


async def test_the_redis_batch_store_maps_out_of_memory_to_a_507_and_reads_do_not_clear_it(
    tmp_path: Path, storage_logs: list[str]
) -> None:
    """The batch store uses the job store's guard: Redis out of memory is a 507 naming the fix, logged
    once; reads (which Redis still answers) do not announce that writes work again; a write does."""
    with capped_redis(tmp_path) as (url, full):
        store = RedisBatchStore(url, prefix="oom-batches")
        await store.open()
        try:
            full(True)
            for index in range(3):
                with pytest.raises(InsufficientStorageError) as refused:
                    await store.create_batch(a_batch(f"batch_{index}"))
                assert await store.list_batches(None) == []  # a read between the refused writes
            assert refused.value.status_code == 507 and "maxmemory" in refused.value.message
            assert sum("out of memory" in line for line in storage_logs) == 1, storage_logs
            assert not any("works again" in line for line in storage_logs), storage_logs
            full(False)
            await store.create_batch(a_batch("batch_ok"))
            assert sum("works again" in line for line in storage_logs) == 1, storage_logs
        finally:
            await store.close()


async def test_a_result_that_could_not_be_written_is_retried_by_its_holder(
    make_settings: Callable[..., Any], app_client: Any
) -> None:
    async with app_client(make_settings(job_lease_s=60.0)) as (client, app):
        store = app.state.textgen.store
        real_finish = store.finish
        calls: list[str] = []

        async def full_twice(*args: Any, **kwargs: Any) -> bool:
            calls.append("finish")
            if len(calls) <= 2:
                raise InsufficientStorageError("The job store's disk is full (test).")
            return bool(await real_finish(*args, **kwargs))

        store.finish = full_twice
        accepted = await client.post("/generate_background", json={"prompt": "Hello", "max_new_tokens": 2})
        job_id = accepted.json()["job_id"]
        view: dict[str, Any] = {}

        async def job_ended() -> bool:
            view.update((await client.get(f"/jobs/{job_id}")).json())
            return view["state"] in ("succeeded", "failed", "cancelled")

        await wait_until(job_ended, 10, f"job {job_id} ending", interval_s=0.025)
        assert view["state"] == "succeeded", view
        assert view["attempts"] == 1  # written by its holder, not reclaimed after the 60 s lease
        assert calls == ["finish"] * 3


async def test_a_full_disk_while_claiming_is_logged_once_and_does_not_flap(
    make_settings: Callable[..., Any], app_client: Any
) -> None:
    """A full disk refuses writes while reads work. Before: a traceback per runner poll (the out-of-space
    error while claiming was not handled like an outage), and "disk full" / "works again" flipping at every
    read in between. Now: one WARNING when it starts, none while it lasts, one INFO line with the count once
    a write succeeds again."""
    async with app_client(make_settings(job_poll_interval_s=0.01)) as (client, app):
        state = app.state.textgen
        failing = inject(state.store)
        state.runner._paused_until = math.inf  # a job waits in the queue when the disk fills up
        accepted = await client.post("/generate_background", json={"prompt": "Hello", "max_new_tokens": 2})
        job_url = accepted.json()["status_url"]
        with textgen_logs() as logs:
            failing.error, failing.only = "database or disk is full", ("UPDATE", "INSERT", "DELETE")
            state.runner._paused_until = 0.0
            polls = state.runner.polls
            await wait_until(lambda: state.runner.polls >= polls + 10, what="ten runner polls on a full disk")
            for _ in range(3):  # reads in between work, and do not announce that the disk works again
                assert (await client.get(job_url)).json()["state"] == "queued"
            assert (await client.get("/ready")).status_code == 200  # generation works; writes answer 507
            await wait_until(lambda: state.runner.polls >= polls + 20, what="ten more polls")
            during = logs.lines(logging.INFO)

            failing.error = None

            async def finished() -> bool:
                return bool((await client.get(job_url)).json()["state"] == "succeeded")

            await wait_until(finished, what="the job claimed and run once the disk has room")

        assert not [line for line in during if "works again" in line], "\n".join(during)
        warnings = logs.lines(logging.WARNING)
        assert len(warnings) == 1, "\n".join(warnings)
        assert "disk is full" in warnings[0] and "TEXTGEN_JOB_STORE" in warnings[0], warnings
        assert not [r for r in logs.records if r.exc_info], "no traceback for a known condition"
        cleared = [line for line in logs.lines(logging.INFO) if "works again" in line]
        assert len(cleared) == 1, logs.lines(logging.INFO)
        # Every refused write was counted (each operation stops at its first refused statement).
        assert int(cleared[0].split("; ")[1].split()[0]) == failing.raised >= 10, (cleared, failing.raised)
