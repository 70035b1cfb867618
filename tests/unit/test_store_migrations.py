"""Versioned SQLite schemas (``textgen.storage.migrations``): a new file gets every step, a file made by
an older release (versioned or not) gets the steps it lacks, once, keeping its data; a file from a newer
release is refused; a failed step changes nothing."""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from textgen.access import ANONYMOUS_OWNER
from textgen.batches import sqlite_store as batch_sqlite
from textgen.batches.sqlite_store import SQLiteBatchStore
from textgen.batches.store import FileUsage, StoredFile, file_to_json
from textgen.errors import ConfigError
from textgen.jobs import sqlite_store as job_sqlite
from textgen.jobs.sqlite_store import SQLiteJobStore
from textgen.storage.migrations import Migration, migrate, schema_version, statements
from textgen.storage.sqlite import connect_sqlite

BODY = {"prompt": "Hello", "max_new_tokens": 2}


def versions(path: Path) -> dict[str, int]:
    with closing(sqlite3.connect(path)) as conn:
        return dict(conn.execute("SELECT component, version FROM schema_versions").fetchall())


def columns(path: Path, table: str) -> set[str]:
    with closing(sqlite3.connect(path)) as conn:
        return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}


def file_at(path: Path, component: str, migrations: tuple[Migration, ...], version: int) -> None:
    """A file as a release whose schema stopped at ``version`` left it."""
    with closing(connect_sqlite(path)) as conn:
        migrate(conn, path, component, migrations[:version])


async def test_a_new_file_gets_every_step_of_both_stores(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    jobs, batches = SQLiteJobStore(path), SQLiteBatchStore(path)
    await jobs.open()
    await batches.open()
    await jobs.close()
    await batches.close()
    assert versions(path) == {"jobs": len(job_sqlite.MIGRATIONS), "batches": len(batch_sqlite.MIGRATIONS)}
    assert {"tenant", "reservation", "phase", "webhook_lease_until"} <= columns(path, "jobs")


async def test_a_job_store_file_at_an_older_version_is_migrated_once_keeping_its_jobs(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    file_at(path, "jobs", job_sqlite.MIGRATIONS, 2)  # before owners, reservations and phases
    assert "tenant" not in columns(path, "jobs")
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute(
            "INSERT INTO jobs (id, request, state, created_at) VALUES ('old-job', ?, 'queued', 1.0)",
            (json.dumps(BODY),),
        )
        conn.execute("INSERT INTO idempotency_keys VALUES ('legacy', 'fp', 'old-job', 1.0)")

    for _ in range(2):  # the second open finds nothing to do (the key is not scoped twice)
        store = SQLiteJobStore(path)
        await store.open()
        try:
            job = await store.get("old-job", tenant=ANONYMOUS_OWNER)
            assert job.tenant == ANONYMOUS_OWNER and job.reservation is None and job.phase is None
        finally:
            await store.close()
        assert versions(path)["jobs"] == len(job_sqlite.MIGRATIONS)
        with closing(sqlite3.connect(path)) as conn:
            [(key,)] = conn.execute("SELECT key FROM idempotency_keys").fetchall()
        assert key.endswith("legacy") and key != "legacy" and not key.endswith("legacylegacy")
        assert key.count("legacy") == 1


async def test_a_file_from_before_versions_keeps_its_columns_and_gets_a_version(tmp_path: Path) -> None:
    """The last release without versions added every column at open: its file has them all and no
    version row. Every step runs again, harmlessly (columns are added only where missing)."""
    path = tmp_path / "jobs.db"
    file_at(path, "jobs", job_sqlite.MIGRATIONS, len(job_sqlite.MIGRATIONS))
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("DROP TABLE schema_versions")
        conn.execute(
            "INSERT INTO jobs (id, request, state, created_at, tenant) VALUES ('j', ?, 'queued', 1.0, 'alice')",
            (json.dumps(BODY),),
        )
        conn.execute("INSERT INTO idempotency_keys VALUES ('alice already-scoped', 'fp', 'j', 1.0)")
    store = SQLiteJobStore(path)
    await store.open()
    try:
        assert (await store.get("j")).tenant == "alice"
    finally:
        await store.close()
    assert versions(path)["jobs"] == len(job_sqlite.MIGRATIONS)
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT key FROM idempotency_keys").fetchall() == [("alice already-scoped",)]


async def test_a_batch_store_file_at_version_1_gets_file_sizes_from_their_records(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    file_at(path, "batches", batch_sqlite.MIGRATIONS, 1)
    old = StoredFile("file-old", "alice", "a.jsonl", "batch", 77, 1.0, 3)
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute(
            "INSERT INTO batch_files VALUES (?, ?, ?, ?, ?)",
            (old.id, old.owner, old.purpose, old.created_at, file_to_json(old)),
        )
    store = SQLiteBatchStore(path)
    await store.open()
    try:
        assert await store.file_usage("alice") == FileUsage(1, 77)
        assert await store.get_file("file-old") == old
    finally:
        await store.close()
    assert versions(path)["batches"] == 2


async def test_a_file_from_a_newer_release_is_refused_with_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    store = SQLiteJobStore(path)
    await store.open()
    await store.close()
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("UPDATE schema_versions SET version = 99 WHERE component = 'jobs'")
    with pytest.raises(ConfigError, match=r"schema version 99.*newer release"):
        await SQLiteJobStore(path).open()
    assert versions(path)["jobs"] == 99  # untouched


def test_a_failed_step_leaves_the_file_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "x.db"

    def broken(conn: sqlite3.Connection) -> None:
        raise sqlite3.OperationalError("step 2 failed")

    steps = (Migration(1, "a table", statements("CREATE TABLE a (x INTEGER)")), Migration(2, "broken", broken))
    with closing(connect_sqlite(path)) as conn:
        with pytest.raises(sqlite3.OperationalError, match="step 2 failed"):
            migrate(conn, path, "test", steps)
        assert schema_version(conn, "test") == 0
        assert conn.execute("SELECT name FROM sqlite_master WHERE name = 'a'").fetchone() is None
        assert migrate(conn, path, "test", steps[:1]) == 1


def test_steps_must_be_numbered_in_order(tmp_path: Path) -> None:
    steps = (Migration(2, "two", statements()), Migration(1, "one", statements()))
    with closing(connect_sqlite(tmp_path / "x.db")) as conn, pytest.raises(ValueError, match="numbered"):
        migrate(conn, tmp_path / "x.db", "test", steps)
