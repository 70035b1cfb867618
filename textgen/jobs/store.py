"""Durable background-job storage.

A job is stored (``queued``), claimed by a runner in some process (``running``, with ``owner`` set),
run, and finished (``succeeded`` / ``failed``) or cancelled. Claims and finishes are conditional
updates, so a job is never handed to two runners and a cancelled or re-queued job is never
overwritten by a late ``finish``. Jobs left ``running`` by a process that died are put back in the
queue at the next start (``requeue_orphaned``); a graceful shutdown hands its own back
(``requeue_owned``).

``create_idempotent`` backs the ``Idempotency-Key`` header: a key remembers the fingerprint of the
request it created a job for, so a retry with the same body gets that job back and a different body
is refused (``IdempotencyConflictError``).

``JobStore`` is the contract; ``SQLiteJobStore`` implements it on one SQLite file in WAL mode, which
several worker processes can share. ``job_store_from_url`` builds a store from ``TEXTGEN_JOB_STORE``;
``sqlite_path_from_url`` is its URL parsing, shared with anything else kept in the same file (rate limits).
"""

from __future__ import annotations

import asyncio
import builtins
import hashlib
import json
import logging
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar, runtime_checkable

from textgen.errors import (
    ConfigError,
    IdempotencyConflictError,
    InvalidRequestError,
    JobNotCancellableError,
    JobNotFoundError,
)

logger = logging.getLogger(__name__)

_P = ParamSpec("_P")
_T = TypeVar("_T")


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL_STATES: frozenset[JobState] = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
_FINISH_STATES: frozenset[JobState] = frozenset({JobState.SUCCEEDED, JobState.FAILED})


@dataclass(frozen=True)
class Job:
    id: str
    request: dict[str, Any]
    state: JobState
    request_id: str | None
    result: dict[str, Any] | None = None
    error: str | None = None
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0
    owner: str | None = None


@runtime_checkable
class JobStore(Protocol):
    """Storage contract for background jobs (SQLite now; Redis later)."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def create(self, request: dict[str, Any], *, request_id: str | None) -> Job: ...

    async def create_idempotent(
        self, request: dict[str, Any], *, request_id: str | None, key: str, ttl_s: float
    ) -> tuple[Job, bool]: ...

    async def get(self, job_id: str) -> Job: ...

    async def list(self, *, state: JobState | None = None, limit: int = 50) -> builtins.list[Job]: ...

    async def claim_next(self, owner: str) -> Job | None: ...

    async def finish(
        self,
        job_id: str,
        owner: str,
        state: JobState,
        *,
        result: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> bool: ...

    async def cancel(self, job_id: str) -> Job: ...

    async def release(self, job_id: str, owner: str) -> bool: ...

    async def requeue_owned(self, owner: str) -> int: ...

    async def requeue_orphaned(self, is_owner_alive: Callable[[str], bool]) -> int: ...

    async def states(self, job_ids: Sequence[str]) -> dict[str, JobState]: ...

    async def purge_finished(self, older_than_s: float) -> int: ...

    async def purge_idempotency(self, older_than_s: float) -> int: ...

    async def count(self, state: JobState) -> int: ...


# --------------------------------------------------------------------------------------------------
# SQLite implementation
# --------------------------------------------------------------------------------------------------

_COLUMNS = "id, request, state, request_id, result, error, created_at, started_at, finished_at, attempts, owner"

_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS jobs (
        id          TEXT PRIMARY KEY,
        request     TEXT NOT NULL,
        state       TEXT NOT NULL,
        request_id  TEXT,
        result      TEXT,
        error       TEXT,
        created_at  REAL NOT NULL,
        started_at  REAL,
        finished_at REAL,
        attempts    INTEGER NOT NULL DEFAULT 0,
        owner       TEXT
    )
    """,
    "CREATE INDEX IF NOT EXISTS jobs_state_created ON jobs (state, created_at)",
    """
    CREATE TABLE IF NOT EXISTS idempotency_keys (
        key         TEXT PRIMARY KEY,
        fingerprint TEXT NOT NULL,
        job_id      TEXT NOT NULL,
        created_at  REAL NOT NULL
    )
    """,
    "CREATE INDEX IF NOT EXISTS idempotency_keys_created ON idempotency_keys (created_at)",
)

_BUSY_TIMEOUT_MS = 10_000
_IN_CHUNK = 500  # ids per "IN (...)" query, well under SQLite's bound-parameter limit
_TERMINAL_SQL = ", ".join(f"'{s.value}'" for s in sorted(TERMINAL_STATES))
IDEMPOTENCY_KEY_MAX_LEN = 255
_IDEMPOTENCY_KEY_RE = re.compile(rf"[\x20-\x7e]{{1,{IDEMPOTENCY_KEY_MAX_LEN}}}")


def _dumps(value: dict[str, Any] | None) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"))


def _row_to_job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"],
        request=json.loads(row["request"]),
        state=JobState(row["state"]),
        request_id=row["request_id"],
        result=None if row["result"] is None else json.loads(row["result"]),
        error=row["error"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        attempts=row["attempts"],
        owner=row["owner"],
    )


@contextmanager
def write_txn(conn: sqlite3.Connection) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` (take the write lock up front) ... ``COMMIT``, rolling back on any error."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _open_error(path: Path, reason: str) -> ConfigError:
    return ConfigError(
        f"Cannot use job store at {path}: {reason}. Set TEXTGEN_JOB_STORE to a writable sqlite:/// path."
    )


def _probe_writable(conn: sqlite3.Connection) -> None:
    """Fail now, not at the first job, if the database cannot be written (the row is rolled back)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(
            "INSERT INTO jobs (id, request, state, created_at) VALUES (?, '{}', ?, 0)",
            (f"__probe_{uuid.uuid4().hex}", JobState.CANCELLED.value),
        )
    finally:
        conn.execute("ROLLBACK")


def connect_sqlite(path: Path, schema: Sequence[str] = ()) -> sqlite3.Connection:
    """Open ``path`` the way the job store does (autocommit, WAL, busy timeout) and run ``schema``.

    Any other table kept in the job store's file (rate limits) opens its own connection with this.
    ConfigError, naming TEXTGEN_JOB_STORE, if the file cannot be opened.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _open_error(path, f"cannot create directory {path.parent} ({exc.strerror or exc})") from exc
    conn: sqlite3.Connection | None = None
    try:
        conn = sqlite3.connect(
            str(path), timeout=_BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
        )
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            logger.warning("Job store %s: journal_mode is %s, not WAL; concurrency suffers.", path, mode)
        conn.execute("PRAGMA synchronous = NORMAL")
        for statement in schema:
            conn.execute(statement)
    except sqlite3.Error as exc:
        if conn is not None:
            conn.close()
        raise _open_error(path, str(exc)) from exc
    return conn


def _connect(path: Path) -> sqlite3.Connection:
    conn = connect_sqlite(path, _SCHEMA)
    try:
        _probe_writable(conn)
    except sqlite3.Error as exc:
        conn.close()
        raise _open_error(path, str(exc)) from exc
    return conn


def _insert(conn: sqlite3.Connection, job: Job) -> None:
    conn.execute(
        f"INSERT INTO jobs ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            job.id,
            _dumps(job.request),
            job.state.value,
            job.request_id,
            _dumps(job.result),
            job.error,
            job.created_at,
            job.started_at,
            job.finished_at,
            job.attempts,
            job.owner,
        ),
    )


def _select_one(conn: sqlite3.Connection, job_id: str) -> Job:
    row = conn.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if row is None:
        raise JobNotFoundError()
    return _row_to_job(row)


def _select_many(conn: sqlite3.Connection, state: JobState | None, limit: int) -> builtins.list[Job]:
    where, params = ("WHERE state = ?", (state.value,)) if state is not None else ("", ())
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM jobs {where} ORDER BY created_at DESC, rowid DESC LIMIT ?", (*params, limit)
    ).fetchall()
    return [_row_to_job(r) for r in rows]


def _claim(conn: sqlite3.Connection, owner: str) -> Job | None:
    with write_txn(conn):
        # The clock is read inside the write lock, so started_at can never precede created_at.
        now = time.time()
        rows = conn.execute(
            "UPDATE jobs SET state = 'running', owner = ?, started_at = ?, attempts = attempts + 1 "
            "WHERE id = (SELECT id FROM jobs WHERE state = 'queued' ORDER BY created_at, rowid LIMIT 1) "
            f"RETURNING {_COLUMNS}",
            (owner, now),
        ).fetchall()
    return _row_to_job(rows[0]) if rows else None


def _unclaim(conn: sqlite3.Connection, job_id: str, owner: str) -> int:
    """Undo a claim whose caller never received the job (its await was cancelled)."""
    return conn.execute(
        "UPDATE jobs SET state = 'queued', owner = NULL, started_at = NULL, attempts = attempts - 1 "
        "WHERE id = ? AND owner = ? AND state = 'running'",
        (job_id, owner),
    ).rowcount


def _finish(
    conn: sqlite3.Connection,
    job_id: str,
    owner: str,
    state: JobState,
    result: str | None,
    error: str | None,
    now: float,
) -> bool:
    cur = conn.execute(
        "UPDATE jobs SET state = ?, result = ?, error = ?, finished_at = ? "
        "WHERE id = ? AND owner = ? AND state = 'running'",
        (state.value, result, error, now, job_id, owner),
    )
    return cur.rowcount == 1


def _cancel(conn: sqlite3.Connection, job_id: str, now: float) -> Job:
    with write_txn(conn):
        rows = conn.execute(
            "UPDATE jobs SET state = 'cancelled', finished_at = ? "
            f"WHERE id = ? AND state IN ('queued', 'running') RETURNING {_COLUMNS}",
            (now, job_id),
        ).fetchall()
        if not rows:
            _select_one(conn, job_id)  # raises JobNotFoundError when absent
            raise JobNotCancellableError()
    return _row_to_job(rows[0])


def _requeue_owner(conn: sqlite3.Connection, owner: str) -> int:
    return conn.execute(
        "UPDATE jobs SET state = 'queued', owner = NULL, started_at = NULL WHERE state = 'running' AND owner = ?",
        (owner,),
    ).rowcount


def _running_owners(conn: sqlite3.Connection) -> builtins.list[str]:
    rows = conn.execute("SELECT DISTINCT owner FROM jobs WHERE state = 'running' AND owner IS NOT NULL").fetchall()
    return [r[0] for r in rows]


def _select_states(conn: sqlite3.Connection, job_ids: Sequence[str]) -> dict[str, JobState]:
    found: dict[str, JobState] = {}
    for i in range(0, len(job_ids), _IN_CHUNK):
        chunk = job_ids[i : i + _IN_CHUNK]
        marks = ", ".join("?" * len(chunk))
        for row in conn.execute(f"SELECT id, state FROM jobs WHERE id IN ({marks})", tuple(chunk)):
            found[row[0]] = JobState(row[1])
    return found


def _purge(conn: sqlite3.Connection, cutoff: float) -> int:
    """Delete finished jobs older than ``cutoff`` and the idempotency records that pointed at them."""
    with write_txn(conn):
        n = conn.execute(f"DELETE FROM jobs WHERE state IN ({_TERMINAL_SQL}) AND finished_at < ?", (cutoff,)).rowcount
        if n:
            conn.execute("DELETE FROM idempotency_keys WHERE NOT EXISTS (SELECT 1 FROM jobs WHERE jobs.id = job_id)")
    return n


def _purge_idempotency(conn: sqlite3.Connection, cutoff: float) -> int:
    return conn.execute("DELETE FROM idempotency_keys WHERE created_at < ?", (cutoff,)).rowcount


# -- idempotency keys ------------------------------------------------------------------------------


def validate_idempotency_key(key: str) -> str:
    """Return ``key`` if it is 1..255 printable ASCII characters, else raise InvalidRequestError."""
    if not isinstance(key, str) or not _IDEMPOTENCY_KEY_RE.fullmatch(key):
        raise InvalidRequestError(
            f"Invalid Idempotency-Key header: it must be 1 to {IDEMPOTENCY_KEY_MAX_LEN} printable ASCII characters."
        )
    return key


def request_fingerprint(request: dict[str, Any]) -> str:
    """sha256 (hex) of the canonical JSON of a request: equal bodies give equal fingerprints."""
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _live_keyed_job(conn: sqlite3.Connection, key: str, cutoff: float) -> tuple[Job, str] | None:
    """The job an unexpired record for ``key`` points at, with the record's fingerprint; None if none."""
    row = conn.execute("SELECT fingerprint, job_id, created_at FROM idempotency_keys WHERE key = ?", (key,)).fetchone()
    if row is None or row["created_at"] < cutoff:
        return None
    try:
        return _select_one(conn, row["job_id"]), row["fingerprint"]
    except JobNotFoundError:  # the job was purged: the record is as good as expired
        return None


def _create_idempotent(
    conn: sqlite3.Connection, job: Job, key: str, fingerprint: str, cutoff: float
) -> tuple[Job, bool]:
    with write_txn(conn):
        found = _live_keyed_job(conn, key, cutoff)
        if found is not None:
            existing, existing_fingerprint = found
            if existing_fingerprint != fingerprint:
                raise IdempotencyConflictError()
            return existing, False
        _insert(conn, job)
        conn.execute(
            "INSERT OR REPLACE INTO idempotency_keys (key, fingerprint, job_id, created_at) VALUES (?, ?, ?, ?)",
            (key, fingerprint, job.id, job.created_at),
        )
    return job, True


def _count(conn: sqlite3.Connection, state: JobState) -> int:
    return int(conn.execute("SELECT COUNT(*) FROM jobs WHERE state = ?", (state.value,)).fetchone()[0])


def _new_job(request: dict[str, Any], request_id: str | None) -> Job:
    return Job(
        id=uuid.uuid4().hex,
        request=json.loads(json.dumps(request)),  # the stored form, detached from the caller's dict
        state=JobState.QUEUED,
        request_id=request_id,
        created_at=time.time(),
    )


class SQLiteConnection:
    """One connection to a SQLite file, used from worker threads (``asyncio.to_thread``) one call at a
    time; the job store and the rate limiter each hold one."""

    def __init__(self, path: Path, connect: Callable[[Path], sqlite3.Connection]) -> None:
        self.path = path
        self._connect = connect
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    async def run(
        self, fn: Callable[Concatenate[sqlite3.Connection, _P], _T], *args: _P.args, **kwargs: _P.kwargs
    ) -> _T:
        """Run ``fn(connection, *args)`` off the event loop, one call at a time."""
        return await asyncio.to_thread(self._locked, fn, *args, **kwargs)

    def _locked(self, fn: Callable[Concatenate[sqlite3.Connection, _P], _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        with self._lock:
            if self._conn is None:
                raise RuntimeError(f"The SQLite connection to {self.path} is not open; call open() first.")
            return fn(self._conn, *args, **kwargs)

    async def open(self) -> None:
        def connect() -> None:
            with self._lock:
                if self._conn is None:
                    self._conn = self._connect(self.path)

        await asyncio.to_thread(connect)

    async def close(self) -> None:
        def disconnect() -> None:
            with self._lock:
                conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()

        await asyncio.to_thread(disconnect)


class SQLiteJobStore:
    """``JobStore`` on one SQLite file (WAL mode), shareable by several processes.

    One connection per object, used from worker threads (``asyncio.to_thread``) one call at a time.
    """

    def __init__(self, path: Path) -> None:
        self._db = SQLiteConnection(Path(path), _connect)
        self._run = self._db.run

    @property
    def path(self) -> Path:
        return self._db.path

    def __repr__(self) -> str:
        return f"SQLiteJobStore({str(self.path)!r})"

    async def open(self) -> None:
        await self._db.open()
        logger.info("Job store open at %s", self.path)

    async def close(self) -> None:
        await self._db.close()

    # -- jobs --------------------------------------------------------------------------------------

    async def create(self, request: dict[str, Any], *, request_id: str | None) -> Job:
        job = _new_job(request, request_id)
        await self._run(_insert, job)
        return job

    async def create_idempotent(
        self, request: dict[str, Any], *, request_id: str | None, key: str, ttl_s: float
    ) -> tuple[Job, bool]:
        """Create a job under an Idempotency-Key, or return the one the key already made.

        In one ``BEGIN IMMEDIATE`` transaction (atomic across processes sharing the file): an
        unexpired record for ``key`` (younger than ``ttl_s``, whose job still exists) with the same
        request fingerprint gives ``(that job, False)``; with a different fingerprint,
        IdempotencyConflictError. Otherwise a new job is stored, the key (re)pointed at it, and
        ``(job, True)`` returned. InvalidRequestError if the key is malformed.
        """
        validate_idempotency_key(key)
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        job = _new_job(request, request_id)
        fingerprint = request_fingerprint(job.request)
        result = await self._run(_create_idempotent, job, key, fingerprint, job.created_at - ttl_s)
        if not result[1]:
            logger.debug("Idempotency-Key replay: returning job %s", result[0].id)
        return result

    async def get(self, job_id: str) -> Job:
        return await self._run(_select_one, job_id)

    async def list(self, *, state: JobState | None = None, limit: int = 50) -> builtins.list[Job]:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        return await self._run(_select_many, state, limit)

    async def claim_next(self, owner: str) -> Job | None:
        claim = asyncio.ensure_future(self._run(_claim, owner))
        try:
            job = await asyncio.shield(claim)
        except asyncio.CancelledError:
            # The claim may still land after we were cancelled; hand such a job straight back.
            job = await asyncio.shield(claim)
            if job is not None:
                await self._run(_unclaim, job.id, owner)
            raise
        if job is not None:
            logger.debug("Job %s claimed by %s (attempt %d)", job.id, owner, job.attempts)
        return job

    async def finish(
        self,
        job_id: str,
        owner: str,
        state: JobState,
        *,
        result: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> bool:
        if state not in _FINISH_STATES:
            raise ValueError(f"finish() state must be succeeded or failed, got {state!r}")
        done = await self._run(_finish, job_id, owner, JobState(state), _dumps(result), error, time.time())
        if not done:
            logger.info("Job %s not finished by %s: no longer running under that owner", job_id, owner)
        return done

    async def cancel(self, job_id: str) -> Job:
        return await self._run(_cancel, job_id, time.time())

    async def release(self, job_id: str, owner: str) -> bool:
        """Hand a claimed job that never started back to the queue (its attempt does not count)."""
        return bool(await self._run(_unclaim, job_id, owner))

    async def requeue_owned(self, owner: str) -> int:
        n = await self._run(_requeue_owner, owner)
        if n:
            logger.info("Re-queued %d running job(s) of %s", n, owner)
        return n

    async def requeue_orphaned(self, is_owner_alive: Callable[[str], bool]) -> int:
        owners = await self._run(_running_owners)
        total = 0
        for owner in owners:
            if not is_owner_alive(owner):
                # Conditional on state + owner, so a job that moved on meanwhile is left alone.
                total += await self._run(_requeue_owner, owner)
        if total:
            logger.warning("Re-queued %d job(s) left running by dead owners", total)
        return total

    async def states(self, job_ids: Sequence[str]) -> dict[str, JobState]:
        if not job_ids:
            return {}
        return await self._run(_select_states, builtins.list(dict.fromkeys(job_ids)))

    async def purge_finished(self, older_than_s: float) -> int:
        """Delete finished jobs older than ``older_than_s`` (and idempotency records left pointing at them)."""
        return await self._run(_purge, time.time() - older_than_s)

    async def purge_idempotency(self, older_than_s: float) -> int:
        """Delete idempotency records older than ``older_than_s`` (pass ``idempotency_ttl_s``); returns how many."""
        return await self._run(_purge_idempotency, time.time() - older_than_s)

    async def count(self, state: JobState) -> int:
        return await self._run(_count, state)


# --------------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------------

_VALID_FORMS = "sqlite:///relative/path/jobs.db (relative to the current directory) or sqlite:////absolute/path/jobs.db"


def _redact(url: str) -> str:
    """Hide any ``user:password@`` part before a URL goes into an error message."""
    return re.sub(r"(://)[^/@]*@", r"\1***@", url)


def sqlite_path_from_url(url: str) -> Path:
    """The database file named by a ``TEXTGEN_JOB_STORE`` URL (relative paths resolved against the
    current directory); ConfigError for Redis, in-memory or malformed URLs."""
    text = url.strip()
    scheme, sep, rest = text.partition("://")
    scheme = scheme.lower()
    if sep and scheme in ("redis", "rediss"):
        raise ConfigError(
            "TEXTGEN_JOB_STORE: the Redis job store is not implemented yet. "
            f"Use a sqlite:/// URL instead: {_VALID_FORMS}."
        )
    if scheme != "sqlite" or not sep or not rest.startswith("/") or len(rest) < 2 or "?" in rest:
        raise ConfigError(f"Invalid TEXTGEN_JOB_STORE {_redact(text)!r}. Use {_VALID_FORMS}.")
    target = rest[1:]
    if target == ":memory:" or target.startswith("file::memory:"):
        raise ConfigError(
            "TEXTGEN_JOB_STORE=sqlite:///:memory: is not supported: jobs must be durable (survive restarts "
            f"and be shared by all workers). Point it at a file: {_VALID_FORMS}."
        )
    path = Path(target)
    return path if path.is_absolute() else Path.cwd() / path


def job_store_from_url(url: str) -> JobStore:
    """Build the store named by ``TEXTGEN_JOB_STORE`` (SQLAlchemy-style URL); ConfigError if unusable."""
    return SQLiteJobStore(sqlite_path_from_url(url))
