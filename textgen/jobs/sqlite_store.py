"""The SQLite job store: one file in WAL mode, shareable by the worker processes of one machine.

Every state change is one conditional UPDATE (claims in ``BEGIN IMMEDIATE ... RETURNING``), so the
``JobStore`` guarantees hold across processes. How the file is opened lives in ``textgen.storage.sqlite``
(shared with the rate limits kept in the same file); this module holds only the job logic.
"""

from __future__ import annotations

import builtins
import dataclasses
import json
import logging
import sqlite3
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from textgen.access import ANONYMOUS_OWNER
from textgen.errors import IdempotencyConflictError, JobNotCancellableError, JobNotFoundError
from textgen.jobs.store import (
    DIED_IN_PHASE_PREFIX,
    DIED_IN_PHASE_SUFFIX,
    STILL_RUNNING,
    TERMINAL_STATES,
    WEBHOOK_OUTCOMES,
    Job,
    JobState,
    WebhookState,
    abandoned_error,
    check_finish_state,
    check_ttl,
    check_visible,
    claim_cancel_safe,
    new_job,
    request_fingerprint,
    scoped_idempotency_key,
    validate_idempotency_key,
)
from textgen.storage.migrations import Migration, add_columns, connect_migrated, new_columns, statements
from textgen.storage.sqlite import SQLiteConnection, write_txn
from textgen.storage.url import sqlite_path_from_url

__all__ = ["SQLiteJobStore", "sqlite_path_from_url"]

logger = logging.getLogger(__name__)

Clock = Callable[[], float]


_COLUMNS = (
    "id, request, state, request_id, result, error, created_at, started_at, finished_at, attempts, owner, "
    "lease_until, callback_url, webhook_state, webhook_attempts, webhook_error, webhook_at, tenant, reservation, phase"
)

# The schema, as ordered migrations (``textgen.storage.migrations``): a new file runs them all, a file
# made by an older release the ones it has not had. Never edit a released step: add the next one.
_BASE_TABLES = statements(
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


def _leases_and_webhooks(conn: sqlite3.Connection) -> None:
    add_columns(
        conn,
        "jobs",
        (
            ("lease_until", "REAL"),
            ("callback_url", "TEXT"),
            ("webhook_state", "TEXT"),
            ("webhook_attempts", "INTEGER NOT NULL DEFAULT 0"),
            ("webhook_error", "TEXT"),
            ("webhook_at", "REAL"),
            ("webhook_owner", "TEXT"),
            ("webhook_lease_until", "REAL"),
        ),
    )
    conn.execute("CREATE INDEX IF NOT EXISTS jobs_state_finished ON jobs (state, finished_at)")
    conn.execute("CREATE INDEX IF NOT EXISTS jobs_webhook ON jobs (webhook_state, webhook_lease_until)")


def _tenants(conn: sqlite3.Connection) -> None:
    # Jobs made before owners existed belong to the anonymous owner (as they would without keys).
    if add_columns(conn, "jobs", (("tenant", f"TEXT NOT NULL DEFAULT '{ANONYMOUS_OWNER}'"),)):
        # Idempotency keys became per-tenant along with the column: old ones are the anonymous owner's.
        conn.execute("UPDATE idempotency_keys SET key = ? || key", (scoped_idempotency_key(ANONYMOUS_OWNER, ""),))
    conn.execute("CREATE INDEX IF NOT EXISTS jobs_tenant_created ON jobs (tenant, created_at)")


MIGRATIONS = (
    Migration(1, "jobs and idempotency keys", _BASE_TABLES),
    Migration(2, "leases and webhooks", _leases_and_webhooks),
    Migration(3, "job owners (tenants)", _tenants),
    Migration(4, "rate-limit reservations", new_columns("jobs", ("reservation", "TEXT"))),
    Migration(5, "risky phases", new_columns("jobs", ("phase", "TEXT"))),
)

_IN_CHUNK = 500  # ids per "IN (...)" query, well under SQLite's bound-parameter limit
_TERMINAL_SQL = ", ".join(f"'{s.value}'" for s in sorted(TERMINAL_STATES))
# Set with every move to a terminal state: a job with a callback URL now has a webhook to deliver.
_WEBHOOK_DUE = (
    "webhook_state = CASE WHEN callback_url IS NULL THEN webhook_state ELSE 'pending' END, "
    "webhook_owner = NULL, webhook_lease_until = NULL"
)


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
        lease_until=row["lease_until"],
        callback_url=row["callback_url"],
        webhook_state=None if row["webhook_state"] is None else WebhookState(row["webhook_state"]),
        webhook_attempts=row["webhook_attempts"],
        webhook_error=row["webhook_error"],
        webhook_at=row["webhook_at"],
        tenant=row["tenant"],
        reservation=row["reservation"],
        phase=row["phase"],
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


def _connect(path: Path) -> sqlite3.Connection:
    return connect_migrated(path, "jobs", MIGRATIONS, _probe_writable)


def _insert(conn: sqlite3.Connection, job: Job) -> None:
    conn.execute(
        f"INSERT INTO jobs ({_COLUMNS}) VALUES ({', '.join('?' * 20)})",
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
            job.lease_until,
            job.callback_url,
            None if job.webhook_state is None else job.webhook_state.value,
            job.webhook_attempts,
            job.webhook_error,
            job.webhook_at,
            job.tenant,
            job.reservation,
            job.phase,
        ),
    )


def _select_one(conn: sqlite3.Connection, job_id: str, tenant: str | None = None) -> Job:
    row = conn.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if row is None:
        raise JobNotFoundError()
    return check_visible(_row_to_job(row), tenant)


def _select_many(
    conn: sqlite3.Connection, state: JobState | None, limit: int, tenant: str | None
) -> builtins.list[Job]:
    conditions = [("state = ?", state.value)] if state is not None else []
    if tenant is not None:
        conditions.append(("tenant = ?", tenant))
    where = ("WHERE " + " AND ".join(c for c, _ in conditions)) if conditions else ""
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM jobs {where} ORDER BY created_at DESC, rowid DESC LIMIT ?",
        (*(value for _, value in conditions), limit),
    ).fetchall()
    return [_row_to_job(r) for r in rows]


def _claim(conn: sqlite3.Connection, owner: str, lease_s: float, clock: Clock) -> Job | None:
    with write_txn(conn):
        # The clock is read inside the write lock, so started_at can never precede created_at.
        now = clock()
        rows = conn.execute(
            "UPDATE jobs SET state = 'running', owner = ?, started_at = ?, lease_until = ?, "
            "attempts = attempts + 1 "
            "WHERE id = (SELECT id FROM jobs WHERE state = 'queued' ORDER BY created_at, rowid LIMIT 1) "
            f"RETURNING {_COLUMNS}",
            (owner, now, now + lease_s),
        ).fetchall()
    return _row_to_job(rows[0]) if rows else None


def _unclaim(conn: sqlite3.Connection, job_id: str, owner: str) -> int:
    """Undo a claim whose caller never received the job (its await was cancelled)."""
    return conn.execute(
        "UPDATE jobs SET state = 'queued', owner = NULL, started_at = NULL, lease_until = NULL, phase = NULL, "
        "attempts = attempts - 1 "
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
        "UPDATE jobs SET state = ?, result = ?, error = ?, finished_at = ?, lease_until = NULL, phase = NULL, "
        f"{_WEBHOOK_DUE} WHERE id = ? AND owner = ? AND state = 'running'",
        (state.value, result, error, now, job_id, owner),
    )
    return cur.rowcount == 1


def _cancel(conn: sqlite3.Connection, job_id: str, now: float, tenant: str | None) -> Job:
    with write_txn(conn):
        rows = conn.execute(
            f"UPDATE jobs SET state = 'cancelled', finished_at = ?, lease_until = NULL, {_WEBHOOK_DUE} "
            "WHERE id = ? AND state IN ('queued', 'running') AND (? IS NULL OR tenant = ?) "
            f"RETURNING {_COLUMNS}",
            (now, job_id, tenant, tenant),
        ).fetchall()
        if not rows:
            _select_one(conn, job_id, tenant)  # raises JobNotFoundError when absent or not the tenant's
            raise JobNotCancellableError()
    return _row_to_job(rows[0])


def _requeue_owner(conn: sqlite3.Connection, owner: str) -> int:
    with write_txn(conn):
        n = conn.execute(
            "UPDATE jobs SET state = 'queued', owner = NULL, started_at = NULL, lease_until = NULL, phase = NULL "
            "WHERE state = 'running' AND owner = ?",
            (owner,),
        ).rowcount
        conn.execute(
            "UPDATE jobs SET webhook_owner = NULL, webhook_lease_until = NULL "
            "WHERE webhook_state = 'pending' AND webhook_owner = ?",
            (owner,),
        )
    return n


def _expire_leases_of(conn: sqlite3.Connection, owner: str) -> int:
    return conn.execute(
        "UPDATE jobs SET lease_until = 0 WHERE state = 'running' AND owner = ?",
        (owner,),
    ).rowcount


def _renew(conn: sqlite3.Connection, owner: str, job_ids: Sequence[str], lease_s: float, clock: Clock) -> set[str]:
    held: set[str] = set()
    with write_txn(conn):
        until = clock() + lease_s
        for i in range(0, len(job_ids), _IN_CHUNK):
            chunk = tuple(job_ids[i : i + _IN_CHUNK])
            marks = ", ".join("?" * len(chunk))
            rows = conn.execute(
                f"UPDATE jobs SET lease_until = ? WHERE state = 'running' AND owner = ? AND id IN ({marks}) "
                "RETURNING id",
                (until, owner, *chunk),
            ).fetchall()
            held.update(r[0] for r in rows)
    return held


def _requeue_expired(conn: sqlite3.Connection, max_attempts: int, clock: Clock) -> tuple[int, int]:
    with write_txn(conn):
        now = clock()
        # A job whose process died while it was marked (set_phase) is failed at once, not retried.
        failed = conn.execute(
            "UPDATE jobs SET state = 'failed', error = ? || phase || ?, phase = NULL, finished_at = ?, "
            f"lease_until = NULL, {_WEBHOOK_DUE} WHERE state = 'running' AND lease_until < ? AND phase IS NOT NULL",
            (DIED_IN_PHASE_PREFIX, DIED_IN_PHASE_SUFFIX, now, now),
        ).rowcount
        failed += conn.execute(
            f"UPDATE jobs SET state = 'failed', error = ?, finished_at = ?, lease_until = NULL, {_WEBHOOK_DUE} "
            "WHERE state = 'running' AND lease_until < ? AND attempts >= ?",
            (abandoned_error(max_attempts), now, now, max_attempts),
        ).rowcount
        requeued = conn.execute(
            "UPDATE jobs SET state = 'queued', owner = NULL, started_at = NULL, lease_until = NULL, phase = NULL "
            "WHERE state = 'running' AND lease_until < ?",
            (now,),
        ).rowcount
    return requeued, failed


def _set_phase(conn: sqlite3.Connection, job_id: str, owner: str, phase: str | None) -> bool:
    return (
        conn.execute(
            "UPDATE jobs SET phase = ? WHERE id = ? AND owner = ? AND state = 'running'", (phase, job_id, owner)
        ).rowcount
        == 1
    )


def _position(conn: sqlite3.Connection, job_id: str) -> int | None:
    row = conn.execute("SELECT rowid, created_at FROM jobs WHERE id = ? AND state = 'queued'", (job_id,)).fetchone()
    if row is None:
        return None
    ahead = conn.execute(
        "SELECT COUNT(*) FROM jobs WHERE state = 'queued' AND (created_at < ? OR (created_at = ? AND rowid < ?))",
        (row["created_at"], row["created_at"], row["rowid"]),
    ).fetchone()[0]
    return int(ahead)


def _recent_completions(conn: sqlite3.Connection, since: float, limit: int) -> builtins.list[float]:
    rows = conn.execute(
        # attempts > 0: jobs the runner ran (a job stored already finished, create_finished, never was)
        "SELECT finished_at FROM jobs WHERE state IN ('succeeded', 'failed') AND finished_at >= ? AND attempts > 0 "
        "ORDER BY finished_at DESC LIMIT ?",
        (since, limit),
    ).fetchall()
    return [float(r[0]) for r in rows]


def _claim_webhook(conn: sqlite3.Connection, owner: str, lease_s: float, clock: Clock) -> Job | None:
    with write_txn(conn):
        now = clock()
        rows = conn.execute(
            "UPDATE jobs SET webhook_owner = ?, webhook_lease_until = ? WHERE id = ("
            "SELECT id FROM jobs WHERE webhook_state = 'pending' "
            "AND (webhook_lease_until IS NULL OR webhook_lease_until < ?) ORDER BY finished_at LIMIT 1) "
            f"RETURNING {_COLUMNS}",
            (owner, now + lease_s, now),
        ).fetchall()
    return _row_to_job(rows[0]) if rows else None


def _record_webhook(
    conn: sqlite3.Connection,
    job_id: str,
    owner: str,
    state: WebhookState,
    attempts: int,
    error: str | None,
    now: float,
) -> bool:
    release = ", webhook_owner = NULL, webhook_lease_until = NULL" if state in WEBHOOK_OUTCOMES else ""
    return (
        conn.execute(
            f"UPDATE jobs SET webhook_state = ?, webhook_attempts = ?, webhook_error = ?, webhook_at = ?{release} "
            "WHERE id = ? AND webhook_owner = ? AND webhook_state = 'pending'",
            (state.value, attempts, error, now, job_id, owner),
        ).rowcount
        == 1
    )


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


def _delete(conn: sqlite3.Connection, job_id: str, tenant: str | None) -> Job:
    with write_txn(conn):
        job = _select_one(conn, job_id, tenant)
        if job.state not in TERMINAL_STATES:
            raise JobNotCancellableError(STILL_RUNNING)
        conn.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        conn.execute("DELETE FROM idempotency_keys WHERE job_id = ?", (job_id,))
    return job


def _purge_idempotency(conn: sqlite3.Connection, cutoff: float) -> int:
    return conn.execute("DELETE FROM idempotency_keys WHERE created_at < ?", (cutoff,)).rowcount


# -- idempotency keys ------------------------------------------------------------------------------


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


class SQLiteJobStore:
    """``JobStore`` on one SQLite file (WAL mode), shareable by several processes.

    One connection per object, used from worker threads (``asyncio.to_thread``) one call at a time.
    """

    def __init__(self, path: Path, *, clock: Clock = time.time) -> None:
        """``clock``: wall-clock seconds for every timestamp and lease (tests pass a fake one)."""
        self._db = SQLiteConnection(Path(path), _connect)
        self._clock = clock
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

    async def create(
        self,
        request: dict[str, Any],
        *,
        request_id: str | None,
        callback_url: str | None = None,
        tenant: str = ANONYMOUS_OWNER,
        reservation: str | None = None,
    ) -> Job:
        job = new_job(request, request_id, callback_url, tenant, reservation, now=self._clock())
        await self._run(_insert, job)
        return job

    async def create_idempotent(
        self,
        request: dict[str, Any],
        *,
        request_id: str | None,
        key: str,
        ttl_s: float,
        callback_url: str | None = None,
        tenant: str = ANONYMOUS_OWNER,
        reservation: str | None = None,
    ) -> tuple[Job, bool]:
        """Create a job under ``tenant``'s Idempotency-Key, or return the one the key already made.

        In one ``BEGIN IMMEDIATE`` transaction (atomic across processes sharing the file): an
        unexpired record for ``key`` (younger than ``ttl_s``, whose job still exists) with the same
        request fingerprint gives ``(that job, False)``; with a different fingerprint,
        IdempotencyConflictError. Otherwise a new job is stored, the key (re)pointed at it, and
        ``(job, True)`` returned. InvalidRequestError if the key is malformed.
        """
        validate_idempotency_key(key)
        check_ttl(ttl_s)
        job = new_job(request, request_id, callback_url, tenant, reservation, now=self._clock())
        fingerprint = request_fingerprint(job.request)
        scoped = scoped_idempotency_key(tenant, key)
        result = await self._run(_create_idempotent, job, scoped, fingerprint, job.created_at - ttl_s)
        if not result[1]:
            logger.debug("Idempotency-Key replay: returning job %s", result[0].id)
        return result

    async def get(self, job_id: str, *, tenant: str | None = None) -> Job:
        return await self._run(_select_one, job_id, tenant)

    async def list(
        self, *, state: JobState | None = None, limit: int = 50, tenant: str | None = None
    ) -> builtins.list[Job]:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        return await self._run(_select_many, state, limit, tenant)

    async def claim_next(self, owner: str, lease_s: float) -> Job | None:
        return await claim_cancel_safe(
            self._run(_claim, owner, lease_s, self._clock), lambda job: self._run(_unclaim, job.id, owner), owner
        )

    async def finish(
        self,
        job_id: str,
        owner: str,
        state: JobState,
        *,
        result: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> bool:
        state = check_finish_state(state)
        done = await self._run(_finish, job_id, owner, state, _dumps(result), error, self._clock())
        if not done:
            logger.info("Job %s not finished by %s: no longer running under that owner", job_id, owner)
        return done

    async def create_finished(
        self,
        request: dict[str, Any],
        *,
        request_id: str | None,
        result: dict[str, Any],
        tenant: str = ANONYMOUS_OWNER,
        job_id: str | None = None,
    ) -> Job:
        job = new_job(request, request_id, None, tenant, None, now=self._clock())
        job = dataclasses.replace(
            job,
            id=job_id or job.id,
            state=JobState.SUCCEEDED,
            result=json.loads(json.dumps(result)),
            finished_at=job.created_at,
        )
        await self._run(_insert, job)
        return job

    async def delete(self, job_id: str, *, tenant: str | None = None) -> Job:
        return await self._run(_delete, job_id, tenant)

    async def set_phase(self, job_id: str, owner: str, phase: str | None) -> bool:
        return bool(await self._run(_set_phase, job_id, owner, phase))

    async def cancel(self, job_id: str, *, tenant: str | None = None) -> Job:
        return await self._run(_cancel, job_id, self._clock(), tenant)

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
                total += await self._run(_expire_leases_of, owner)
        return total

    async def renew(self, owner: str, job_ids: Sequence[str], lease_s: float) -> set[str]:
        if not job_ids:
            return set()
        return await self._run(_renew, owner, builtins.list(dict.fromkeys(job_ids)), lease_s, self._clock)

    async def requeue_expired(self, max_attempts: int) -> tuple[int, int]:
        return await self._run(_requeue_expired, max_attempts, self._clock)

    async def position(self, job_id: str) -> int | None:
        return await self._run(_position, job_id)

    async def recent_completions(self, within_s: float, limit: int) -> builtins.list[float]:
        return await self._run(_recent_completions, self._clock() - within_s, limit)

    async def claim_webhook(self, owner: str, lease_s: float) -> Job | None:
        return await self._run(_claim_webhook, owner, lease_s, self._clock)

    async def record_webhook(
        self, job_id: str, owner: str, state: WebhookState, *, attempts: int, error: str | None
    ) -> bool:
        return await self._run(_record_webhook, job_id, owner, WebhookState(state), attempts, error, self._clock())

    async def states(self, job_ids: Sequence[str]) -> dict[str, JobState]:
        if not job_ids:
            return {}
        return await self._run(_select_states, builtins.list(dict.fromkeys(job_ids)))

    async def purge_finished(self, older_than_s: float) -> int:
        """Delete finished jobs older than ``older_than_s`` (and idempotency records left pointing at them)."""
        return await self._run(_purge, self._clock() - older_than_s)

    async def purge_idempotency(self, older_than_s: float) -> int:
        """Delete idempotency records older than ``older_than_s`` (pass ``idempotency_ttl_s``); returns how many."""
        return await self._run(_purge_idempotency, self._clock() - older_than_s)

    async def count(self, state: JobState) -> int:
        return await self._run(_count, state)
