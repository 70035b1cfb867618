"""``BatchStore`` in the job store's SQLite file (its own tables and connection, WAL, shared by the
processes of one machine). Lease checks are conditional UPDATEs, as in the job store."""

from __future__ import annotations

import builtins
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from textgen.batches.store import (
    ACTIVE_STATUSES,
    Batch,
    BatchNotFoundError,
    FileNotFoundInStoreError,
    FileQuota,
    FileUsage,
    Line,
    LineOutcome,
    StoredFile,
    batch_from_json,
    batch_to_json,
    file_from_json,
    file_to_json,
)
from textgen.storage.migrations import Migration, add_columns, connect_migrated, statements
from textgen.storage.sqlite import SQLiteConnection, write_txn

# The schema, as ordered migrations (``textgen.storage.migrations``): a new file runs them all, a file
# made by an older release the ones it has not had. Never edit a released step: add the next one.
_BASE_TABLES = statements(
    """
    CREATE TABLE IF NOT EXISTS batch_files (
        id TEXT PRIMARY KEY, owner TEXT NOT NULL, purpose TEXT NOT NULL, created_at REAL NOT NULL, data TEXT NOT NULL
    )
    """,
    "CREATE INDEX IF NOT EXISTS batch_files_owner ON batch_files (owner, created_at)",
    """
    CREATE TABLE IF NOT EXISTS batches (
        id TEXT PRIMARY KEY, owner TEXT NOT NULL, created_at REAL NOT NULL, status TEXT NOT NULL,
        data TEXT NOT NULL, cancel_requested_at REAL, lease_owner TEXT, lease_until REAL,
        next_check_at REAL, due INTEGER NOT NULL DEFAULT 1
    )
    """,
    "CREATE INDEX IF NOT EXISTS batches_owner ON batches (owner, created_at)",
    "CREATE INDEX IF NOT EXISTS batches_due ON batches (due, next_check_at)",
    """
    CREATE TABLE IF NOT EXISTS batch_lines (
        batch_id TEXT NOT NULL, line INTEGER NOT NULL, custom_id TEXT NOT NULL, job_id TEXT, outcome TEXT,
        PRIMARY KEY (batch_id, line)
    )
    """,
    "CREATE UNIQUE INDEX IF NOT EXISTS batch_lines_custom_id ON batch_lines (batch_id, custom_id)",
    "CREATE INDEX IF NOT EXISTS batch_lines_open ON batch_lines (batch_id, outcome, line)",
)


def _file_quotas_and_expiry(conn: sqlite3.Connection) -> None:
    """Each file's size as a column (copied out of its JSON, for quotas) and its expiry time."""
    added = add_columns(conn, "batch_files", (("bytes", "INTEGER NOT NULL DEFAULT 0"), ("expires_at", "REAL")))
    if "bytes" in added:
        conn.execute("UPDATE batch_files SET bytes = COALESCE(json_extract(data, '$.bytes'), 0)")
    conn.execute(
        "CREATE INDEX IF NOT EXISTS batch_files_expiry ON batch_files (expires_at) WHERE expires_at IS NOT NULL"
    )


MIGRATIONS = (
    Migration(1, "files, batches and their lines", _BASE_TABLES),
    Migration(2, "file quotas and expiry", _file_quotas_and_expiry),
)

_ACTIVE_SQL = ", ".join(f"'{s.value}'" for s in sorted(ACTIVE_STATUSES))


def _batch(row: sqlite3.Row) -> Batch:
    return batch_from_json(row["data"], row["cancel_requested_at"])


def _connect(path: Path) -> sqlite3.Connection:
    return connect_migrated(path, "batches", MIGRATIONS)


def _put_file(conn: sqlite3.Connection, record: StoredFile) -> None:
    conn.execute(
        "INSERT OR REPLACE INTO batch_files (id, owner, purpose, created_at, data, bytes, expires_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            record.id,
            record.owner,
            record.purpose,
            record.created_at,
            file_to_json(record),
            record.bytes,
            record.expires_at,
        ),
    )


def _file_usage(conn: sqlite3.Connection, owner: str) -> FileUsage:
    row = conn.execute(
        "SELECT COUNT(*) AS files, COALESCE(SUM(bytes), 0) AS bytes FROM batch_files WHERE owner = ?", (owner,)
    ).fetchone()
    return FileUsage(int(row["files"]), int(row["bytes"]))


def _add_file(conn: sqlite3.Connection, record: StoredFile, quota: FileQuota) -> bool:
    with write_txn(conn):  # the write lock first, so a racing upload waits for this one's decision
        usage = _file_usage(conn, record.owner)
        if (quota.max_files and usage.files + 1 > quota.max_files) or (
            quota.max_bytes and usage.bytes + record.bytes > quota.max_bytes
        ):
            return False
        _put_file(conn, record)
    return True


def _expired_files(conn: sqlite3.Connection, now: float, limit: int) -> builtins.list[StoredFile]:
    rows = conn.execute(
        "SELECT data FROM batch_files WHERE expires_at IS NOT NULL AND expires_at <= ? ORDER BY expires_at LIMIT ?",
        (now, limit),
    ).fetchall()
    return [file_from_json(row["data"]) for row in rows]


def _get_file(conn: sqlite3.Connection, file_id: str) -> StoredFile:
    row = conn.execute("SELECT data FROM batch_files WHERE id = ?", (file_id,)).fetchone()
    if row is None:
        raise FileNotFoundInStoreError()
    return file_from_json(row["data"])


def _list_files(
    conn: sqlite3.Connection, owner: str | None, purpose: str | None, limit: int
) -> builtins.list[StoredFile]:
    rows = conn.execute(
        "SELECT data FROM batch_files WHERE (?1 IS NULL OR owner = ?1) AND (?2 IS NULL OR purpose = ?2) "
        "ORDER BY created_at DESC LIMIT ?3",
        (owner, purpose, limit),
    ).fetchall()
    return [file_from_json(row["data"]) for row in rows]


def _delete_file(conn: sqlite3.Connection, file_id: str) -> bool:
    return conn.execute("DELETE FROM batch_files WHERE id = ?", (file_id,)).rowcount > 0


def _create_batch(conn: sqlite3.Connection, batch: Batch) -> None:
    conn.execute(
        "INSERT INTO batches (id, owner, created_at, status, data, next_check_at) VALUES (?, ?, ?, ?, ?, 0)",
        (batch.id, batch.owner, batch.created_at, batch.status.value, batch_to_json(batch)),
    )


def _get_batch(conn: sqlite3.Connection, batch_id: str) -> Batch:
    row = conn.execute("SELECT data, cancel_requested_at FROM batches WHERE id = ?", (batch_id,)).fetchone()
    if row is None:
        raise BatchNotFoundError()
    return _batch(row)


def _list_batches(conn: sqlite3.Connection, owner: str | None, limit: int) -> builtins.list[Batch]:
    rows = conn.execute(
        "SELECT data, cancel_requested_at FROM batches WHERE (?1 IS NULL OR owner = ?1) "
        "ORDER BY created_at DESC LIMIT ?2",
        (owner, limit),
    ).fetchall()
    return [_batch(row) for row in rows]


def _request_cancel(conn: sqlite3.Connection, batch_id: str, now: float) -> Batch:
    conn.execute(
        "UPDATE batches SET cancel_requested_at = COALESCE(cancel_requested_at, ?), due = 1, next_check_at = 0 "
        f"WHERE id = ? AND status IN ({_ACTIVE_SQL})",
        (now, batch_id),
    )
    return _get_batch(conn, batch_id)


def _claim_due(conn: sqlite3.Connection, worker: str, lease_s: float, limit: int, now: float) -> builtins.list[Batch]:
    with write_txn(conn):
        rows = conn.execute(
            "UPDATE batches SET lease_owner = ?, lease_until = ? WHERE id IN ("
            "  SELECT id FROM batches WHERE due = 1 AND next_check_at <= ? AND (lease_until IS NULL OR lease_until < ?)"
            "  ORDER BY next_check_at LIMIT ?"
            ") RETURNING data, cancel_requested_at",
            (worker, now + lease_s, now, now, limit),
        ).fetchall()
    return [_batch(row) for row in rows]


def _save(conn: sqlite3.Connection, batch: Batch, worker: str) -> bool:
    cursor = conn.execute(
        "UPDATE batches SET status = ?, data = ? WHERE id = ? AND lease_owner = ?",
        (batch.status.value, batch_to_json(batch), batch.id, worker),
    )
    return cursor.rowcount > 0


def _release(conn: sqlite3.Connection, batch_id: str, worker: str, next_check_at: float, done: bool) -> None:
    conn.execute(
        "UPDATE batches SET lease_owner = NULL, lease_until = NULL, next_check_at = ?, "
        "due = CASE WHEN ? THEN 0 ELSE 1 END WHERE id = ? AND lease_owner = ?",
        (next_check_at, done, batch_id, worker),
    )


def _clear_lines(conn: sqlite3.Connection, batch_id: str) -> None:
    conn.execute("DELETE FROM batch_lines WHERE batch_id = ?", (batch_id,))


def _add_lines(conn: sqlite3.Connection, batch_id: str, lines: Sequence[tuple[int, str]]) -> builtins.list[int]:
    duplicates: builtins.list[int] = []
    with write_txn(conn):
        for number, custom_id in lines:
            cursor = conn.execute(
                "INSERT OR IGNORE INTO batch_lines (batch_id, line, custom_id) VALUES (?, ?, ?)",
                (batch_id, number, custom_id),
            )
            if cursor.rowcount == 0:
                row = conn.execute(
                    "SELECT line FROM batch_lines WHERE batch_id = ? AND custom_id = ?", (batch_id, custom_id)
                ).fetchone()
                if row is None or row["line"] != number:
                    duplicates.append(number)
    return duplicates


def _set_jobs(conn: sqlite3.Connection, batch_id: str, jobs: Sequence[tuple[int, str]]) -> None:
    with write_txn(conn):
        conn.executemany(
            "UPDATE batch_lines SET job_id = ? WHERE batch_id = ? AND line = ?",
            [(job_id, batch_id, number) for number, job_id in jobs],
        )


def _open_lines(conn: sqlite3.Connection, batch_id: str, after: int, limit: int) -> builtins.list[tuple[int, str]]:
    rows = conn.execute(
        "SELECT line, job_id FROM batch_lines WHERE batch_id = ? AND outcome IS NULL AND job_id IS NOT NULL "
        "AND line > ? ORDER BY line LIMIT ?",
        (batch_id, after, limit),
    ).fetchall()
    return [(row["line"], row["job_id"]) for row in rows]


def _set_outcomes(conn: sqlite3.Connection, batch_id: str, outcomes: Sequence[tuple[int, LineOutcome]]) -> None:
    with write_txn(conn):
        conn.executemany(
            "UPDATE batch_lines SET outcome = ? WHERE batch_id = ? AND line = ? AND outcome IS NULL",
            [(outcome.value, batch_id, number) for number, outcome in outcomes],
        )


def _outcome_counts(conn: sqlite3.Connection, batch_id: str) -> dict[LineOutcome, int]:
    rows = conn.execute(
        "SELECT outcome, COUNT(*) AS n FROM batch_lines WHERE batch_id = ? AND outcome IS NOT NULL GROUP BY outcome",
        (batch_id,),
    ).fetchall()
    return {LineOutcome(row["outcome"]): row["n"] for row in rows}


def _lines(conn: sqlite3.Connection, batch_id: str, after: int, limit: int) -> builtins.list[Line]:
    rows = conn.execute(
        "SELECT line, custom_id, job_id, outcome FROM batch_lines WHERE batch_id = ? AND line > ? "
        "ORDER BY line LIMIT ?",
        (batch_id, after, limit),
    ).fetchall()
    return [
        Line(row["line"], row["custom_id"], row["job_id"], LineOutcome(row["outcome"]) if row["outcome"] else None)
        for row in rows
    ]


class SQLiteBatchStore:
    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        """``clock``: wall-clock seconds for leases and timestamps (tests pass a fake one)."""
        self._clock = clock
        self._db = SQLiteConnection(Path(path), _connect, role="batches")
        self._run = self._db.run

    def __repr__(self) -> str:
        return f"SQLiteBatchStore({str(self._db.path)!r})"

    async def open(self) -> None:
        await self._db.open()

    async def close(self) -> None:
        await self._db.close()

    async def put_file(self, record: StoredFile) -> None:
        await self._run(_put_file, record)

    async def get_file(self, file_id: str) -> StoredFile:
        return await self._run(_get_file, file_id)

    async def list_files(
        self, owner: str | None, *, purpose: str | None = None, limit: int = 100
    ) -> builtins.list[StoredFile]:
        return await self._run(_list_files, owner, purpose, limit)

    async def add_file(self, record: StoredFile, quota: FileQuota) -> bool:
        return await self._run(_add_file, record, quota)

    async def file_usage(self, owner: str) -> FileUsage:
        return await self._run(_file_usage, owner)

    async def expired_files(self, now: float, limit: int) -> builtins.list[StoredFile]:
        return await self._run(_expired_files, now, limit)

    async def delete_file(self, file_id: str) -> bool:
        return await self._run(_delete_file, file_id)

    async def create_batch(self, batch: Batch) -> None:
        await self._run(_create_batch, batch)

    async def get_batch(self, batch_id: str) -> Batch:
        return await self._run(_get_batch, batch_id)

    async def list_batches(self, owner: str | None, *, limit: int = 20) -> builtins.list[Batch]:
        return await self._run(_list_batches, owner, limit)

    async def request_cancel(self, batch_id: str) -> Batch:
        return await self._run(_request_cancel, batch_id, self._clock())

    async def claim_due(self, worker: str, lease_s: float, limit: int) -> builtins.list[Batch]:
        return await self._run(_claim_due, worker, lease_s, limit, self._clock())

    async def save(self, batch: Batch, worker: str) -> bool:
        return await self._run(_save, batch, worker)

    async def release(self, batch_id: str, worker: str, next_check_at: float, *, done: bool) -> None:
        await self._run(_release, batch_id, worker, next_check_at, done)

    async def clear_lines(self, batch_id: str) -> None:
        await self._run(_clear_lines, batch_id)

    async def add_lines(self, batch_id: str, lines: Sequence[tuple[int, str]]) -> builtins.list[int]:
        return await self._run(_add_lines, batch_id, lines)

    async def set_jobs(self, batch_id: str, jobs: Sequence[tuple[int, str]]) -> None:
        await self._run(_set_jobs, batch_id, jobs)

    async def open_lines(self, batch_id: str, after: int, limit: int) -> builtins.list[tuple[int, str]]:
        return await self._run(_open_lines, batch_id, after, limit)

    async def set_outcomes(self, batch_id: str, outcomes: Sequence[tuple[int, LineOutcome]]) -> None:
        await self._run(_set_outcomes, batch_id, outcomes)

    async def outcome_counts(self, batch_id: str) -> dict[LineOutcome, int]:
        return await self._run(_outcome_counts, batch_id)

    async def lines(self, batch_id: str, after: int, limit: int) -> builtins.list[Line]:
        return await self._run(_lines, batch_id, after, limit)
