"""Versioned SQLite schemas: each store's tables carry a version, and ordered migrations bring an older
file up to date when a store opens it.

The job store, the batch store and the rate limiter keep their tables in one file, so one
``PRAGMA user_version`` could not tell their versions apart: the ``schema_versions`` table holds one row
per component (``jobs``, ``batches``). ``migrate`` runs inside one ``BEGIN IMMEDIATE`` transaction, so
of several processes opening the same file at once one migrates and the others see the result; a
migration that fails leaves the file as it was.

Files made before versions existed have no row: they start at version 0 and every migration runs.
Such a file may already have any of the later columns (they used to be added ad hoc at open), so a
migration that adds a column adds it only where it is missing (``add_columns``).

A file whose version is newer than this code knows (written by a newer release) is refused with a
``ConfigError``: an older release must not write tables whose meaning it does not know.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from textgen.errors import ConfigError
from textgen.storage.sqlite import connect_sqlite, open_error, write_txn

logger = logging.getLogger(__name__)

VERSIONS_TABLE = "schema_versions"


@dataclass(frozen=True)
class Migration:
    version: int  # 1, 2, ...: the version the file has once this step ran
    what: str  # for the log line
    apply: Callable[[sqlite3.Connection], None]


def statements(*sql: str) -> Callable[[sqlite3.Connection], None]:
    """A migration step that runs these statements in order."""

    def run(conn: sqlite3.Connection) -> None:
        for statement in sql:
            conn.execute(statement)

    return run


def add_columns(conn: sqlite3.Connection, table: str, columns: Sequence[tuple[str, str]]) -> set[str]:
    """``ALTER TABLE ... ADD COLUMN`` for each ``(name, declaration)`` the table lacks; the names added."""
    present = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
    added = set()
    for name, declaration in columns:
        if name not in present:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {declaration}")
            added.add(name)
    return added


def new_columns(table: str, *columns: tuple[str, str]) -> Callable[[sqlite3.Connection], None]:
    """A migration step that adds these ``(name, declaration)`` columns where they are missing."""

    def run(conn: sqlite3.Connection) -> None:
        add_columns(conn, table, columns)

    return run


def schema_version(conn: sqlite3.Connection, component: str) -> int:
    """The component's version in this file (0: never versioned, or not there yet)."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (VERSIONS_TABLE,)).fetchone():
        row = conn.execute(f"SELECT version FROM {VERSIONS_TABLE} WHERE component = ?", (component,)).fetchone()
        return int(row[0]) if row else 0
    return 0


def check_order(migrations: Sequence[Migration]) -> None:
    versions = [migration.version for migration in migrations]
    if versions != list(range(1, len(versions) + 1)):
        raise ValueError(f"migrations must be numbered 1, 2, ... in order, got {versions}")


def migrate(conn: sqlite3.Connection, path: Path, component: str, migrations: Sequence[Migration]) -> int:
    """Run the migrations the file has not had yet, in order, in one write transaction; the version the
    file is at afterwards. ConfigError if the file is newer than ``migrations`` know."""
    check_order(migrations)
    latest = len(migrations)
    with write_txn(conn):
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {VERSIONS_TABLE} (component TEXT PRIMARY KEY, version INTEGER NOT NULL)"
        )
        current = schema_version(conn, component)
        if current > latest:
            raise ConfigError(
                f"The {component} tables in {path} are at schema version {current}, but this release knows only "
                f"up to {latest}: the file was written by a newer release of textgen. Run that release (or a newer "
                "one), or point TEXTGEN_JOB_STORE at another file."
            )
        for migration in migrations[current:]:
            migration.apply(conn)
        if current < latest:
            conn.execute(
                f"INSERT INTO {VERSIONS_TABLE} (component, version) VALUES (?, ?) "
                "ON CONFLICT (component) DO UPDATE SET version = excluded.version",
                (component, latest),
            )
    if current < latest:
        steps = ", ".join(f"{m.version}: {m.what}" for m in migrations[current:])
        logger.info("Store %s: %s tables migrated from version %d to %d (%s)", path, component, current, latest, steps)
    return latest


def connect_migrated(
    path: Path,
    component: str,
    migrations: Sequence[Migration],
    check: Callable[[sqlite3.Connection], None] | None = None,
) -> sqlite3.Connection:
    """A store's connection: opened (``connect_sqlite``), migrated, then ``check``ed. A SQLite error is the
    ConfigError that names TEXTGEN_JOB_STORE; the connection is closed on any failure."""
    conn = connect_sqlite(path)
    try:
        migrate(conn, path, component, migrations)
        if check is not None:
            check(conn)
    except sqlite3.Error as exc:
        conn.close()
        raise open_error(path, str(exc)) from exc
    except BaseException:  # a file newer than this release (ConfigError), an interrupt
        conn.close()
        raise
    return conn
