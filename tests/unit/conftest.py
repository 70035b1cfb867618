"""The job-store backends the conformance suite runs against: SQLite (a file in tmp_path) and Redis (the
session's real redis-server, under a key prefix of the test's own).

``backend`` is parametrized over both; ``open_store()`` opens another store object on the same data (a
second process, as far as the store can tell); ``store`` is the first one. ``Backend`` also reaches
under the store for the few checks the contract cannot express (is a record gone, a job deleted behind
the store's back, hold the store's writes).
"""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, closing
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest
import redis
import redis.asyncio

from textgen.jobs.redis_store import RedisJobStore
from textgen.jobs.sqlite_store import SQLiteJobStore
from textgen.jobs.store import JobStore

BACKENDS = ["sqlite", "redis"]


@dataclass
class Backend:
    """Where one test's jobs live: a SQLite file (``target`` = its path) or a Redis prefix (``target`` = URL)."""

    name: str
    target: str
    prefix: str = ""

    def new_store(self, clock: Callable[[], float] | None = None) -> JobStore:
        if self.name == "redis":
            return RedisJobStore(self.target, prefix=self.prefix, clock=clock)
        return SQLiteJobStore(Path(self.target), clock=clock or time.time)

    def argv(self) -> list[str]:
        """What a subprocess needs to open a store on the same data (see ``SUBPROCESS_STORE``)."""
        return [self.name, self.target, self.prefix or "-"]

    def idempotency_keys(self) -> list[str]:
        """The Idempotency-Keys that have a stored record, sorted (as "<owner id> <key>": keys are per owner)."""
        if self.name == "redis":
            with closing(redis.Redis.from_url(self.target, decode_responses=True)) as raw:
                start = len(f"{self.prefix}:idem:")
                return sorted(key[start:] for key in raw.scan_iter(match=f"{self.prefix}:idem:*"))
        with closing(sqlite3.connect(self.target)) as conn:
            return sorted(row[0] for row in conn.execute("SELECT key FROM idempotency_keys"))

    def delete_job(self, job_id: str) -> None:
        """Delete a job behind the store's back (leaving any idempotency record dangling)."""
        if self.name == "redis":
            with closing(redis.Redis.from_url(self.target)) as raw:
                raw.delete(f"{self.prefix}:job:{job_id}")
            return
        with closing(sqlite3.connect(self.target)) as conn, conn:
            conn.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    @asynccontextmanager
    async def writes_held(self, store: JobStore) -> AsyncIterator[HeldWrites]:
        """While inside, the store's writes wait (SQLite: its connection lock; Redis: CLIENT PAUSE WRITE);
        the ``HeldWrites`` it yields counts the writes waiting, the positive signal that a call got there."""
        if self.name == "sqlite":
            sqlite_store = cast(SQLiteJobStore, store)
            lock = sqlite_store._db._lock
            counted = sqlite_store._db._lock = WaitCountingLock(lock)
            lock.acquire()
            try:
                yield HeldWrites(counted.waiting_now)
            finally:
                lock.release()
                sqlite_store._db._lock = lock
            return
        raw = redis.asyncio.Redis.from_url(self.target)
        try:
            await raw.client_pause(10_000, all=False)
            try:

                async def paused_clients() -> int:
                    return int((await raw.info("clients"))["blocked_clients"])

                yield HeldWrites(paused_clients)
            finally:
                await raw.client_unpause()
        finally:
            await raw.aclose()

    def cleanup(self) -> None:
        if self.name != "redis":
            return
        with closing(redis.Redis.from_url(self.target)) as raw:
            keys = list(raw.scan_iter(match=f"{self.prefix}:*", count=1000))
            if keys:
                raw.delete(*keys)


class WaitCountingLock:
    """A store's connection lock that counts the ``with lock:`` callers waiting for it right now."""

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock
        self._waiting = 0
        self._count_lock = threading.Lock()

    async def waiting_now(self) -> int:
        with self._count_lock:
            return self._waiting

    def acquire(self) -> bool:
        return self._lock.acquire()

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> WaitCountingLock:
        with self._count_lock:
            self._waiting += 1
        self._lock.acquire()
        with self._count_lock:
            self._waiting -= 1
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._lock.release()


@dataclass
class HeldWrites:
    """What ``Backend.writes_held`` yields: ``await waiting()`` is the number of writes waiting."""

    waiting: Callable[[], Awaitable[int]]


# A subprocess opens its store with this (``Backend.argv()`` as sys.argv[1:4]).
SUBPROCESS_STORE = """
from pathlib import Path
from textgen.jobs.redis_store import RedisJobStore
from textgen.jobs.sqlite_store import SQLiteJobStore

def make_store(kind, target, prefix):
    return RedisJobStore.from_url(target, prefix=prefix) if kind == "redis" else SQLiteJobStore(Path(target))
"""


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "redis":
        # Only Redis runs need the server, so SQLite-only selections never start one.
        server = request.getfixturevalue("redis_server")
        chosen = Backend("redis", server.url(0), prefix=f"test-{uuid.uuid4().hex[:12]}")
    else:
        chosen = Backend("sqlite", str(tmp_path / "jobs.db"))
    try:
        yield chosen
    finally:
        chosen.cleanup()


class StoreClock:
    """The stores' clock in the conformance suite: real time plus whatever the test skipped ahead, so a
    test moves past a lease or a TTL with ``advance`` instead of sleeping (and stores in subprocesses,
    on the real clock, still agree with it while nothing was skipped)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


@pytest.fixture
def store_clock() -> StoreClock:
    return StoreClock()


OpenStore = Callable[[], Awaitable[JobStore]]


@pytest.fixture
async def open_store(backend: Backend, store_clock: StoreClock) -> AsyncIterator[OpenStore]:
    """``await open_store()``: another open store object on the test's data, on ``store_clock``; all
    closed afterwards."""
    opened: list[JobStore] = []

    async def factory() -> JobStore:
        s = backend.new_store(store_clock)
        await s.open()
        opened.append(s)
        return s

    yield factory
    for s in opened:
        await s.close()


@pytest.fixture
async def store(open_store: OpenStore) -> JobStore:
    return await open_store()
