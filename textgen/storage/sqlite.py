"""The one SQLite connection helper: how the job store's file is opened (autocommit, WAL, busy
timeout), ``BEGIN IMMEDIATE`` transactions, and ``SQLiteConnection`` (one connection used from worker
threads one call at a time). The job store and the rate limiter each hold one on the same file.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Concatenate, ParamSpec, TypeVar

from textgen.errors import ConfigError
from textgen.storage.conditions import CONDITIONS, sqlite_condition

logger = logging.getLogger(__name__)

_P = ParamSpec("_P")
_T = TypeVar("_T")

BUSY_TIMEOUT_MS = 10_000


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


def open_error(path: Path, reason: str) -> ConfigError:
    return ConfigError(
        f"Cannot use job store at {path}: {reason}. Set TEXTGEN_JOB_STORE to a writable sqlite:/// path."
    )


def connect_sqlite(path: Path, schema: Sequence[str] = ()) -> sqlite3.Connection:
    """Open ``path`` the way the job store does (autocommit, WAL, busy timeout) and run ``schema``.

    Any other table kept in the job store's file (rate limits) opens its own connection with this.
    ConfigError, naming TEXTGEN_JOB_STORE, if the file cannot be opened.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise open_error(path, f"cannot create directory {path.parent} ({exc.strerror or exc})") from exc
    conn: sqlite3.Connection | None = None
    try:
        conn = sqlite3.connect(
            str(path), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
        )
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            logger.warning("Job store %s: journal_mode is %s, not WAL; concurrency suffers.", path, mode)
        conn.execute("PRAGMA synchronous = NORMAL")
        for statement in schema:
            conn.execute(statement)
    except sqlite3.Error as exc:
        if conn is not None:
            conn.close()
        raise open_error(path, str(exc)) from exc
    return conn


class SQLiteConnection:
    """One connection to a SQLite file, used from worker threads (``asyncio.to_thread``) one call at a
    time; the job store and the rate limiter each hold one."""

    def __init__(self, path: Path, connect: Callable[[Path], sqlite3.Connection], role: str = "jobs") -> None:
        self.path = path
        # Conditions (disk full, ...) are tracked per file: the job store, the batch tables and the rate
        # limiter share it, and a full disk is one condition, logged once. A write that succeeds in any of
        # them proves the file takes writes again.
        self.role = role
        self._condition_key = f"sqlite {path}"
        self._connect = connect
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    async def run(
        self, fn: Callable[Concatenate[sqlite3.Connection, _P], _T], *args: _P.args, **kwargs: _P.kwargs
    ) -> _T:
        """Run ``fn(connection, *args)`` off the event loop, one call at a time."""
        return await asyncio.to_thread(functools.partial(self._locked, fn, *args, **kwargs))

    def _locked(self, fn: Callable[Concatenate[sqlite3.Connection, _P], _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        with self._lock:
            if self._conn is None:
                raise RuntimeError(f"The SQLite connection to {self.path} is not open; call open() first.")
            changes = self._conn.total_changes
            try:
                result = fn(self._conn, *args, **kwargs)
            except sqlite3.OperationalError as error:
                mapped = sqlite_condition(error, str(self.path))
                if mapped is None:
                    raise
                CONDITIONS.enter(
                    self._condition_key,
                    f"{type(mapped).__name__}: {error}",
                    mapped.message,
                    # In WAL mode readers are never blocked, not by a full disk nor by a lock: only a write
                    # that succeeds shows that the condition has cleared.
                    writes_only=True,
                )
                raise mapped from error
            # total_changes counts committed row changes: a read, or a write that matched nothing, does not
            # prove that a full disk takes writes again.
            CONDITIONS.clear(self._condition_key, wrote=self._conn.total_changes != changes)
            return result

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
