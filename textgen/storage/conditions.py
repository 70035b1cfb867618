"""Store errors that are the environment's, not ours, mapped to one clear answer and logged once.

A full disk under the SQLite file, a file that became read-only, a database locked past the busy
timeout, a Redis server out of memory or refusing writes after a failed snapshot: each becomes a
client error naming the cause and the action (``InsufficientStorageError`` 507, or
``StoreUnavailableError`` 503 for a lock that may clear by itself), instead of a 500 with a traceback
per request. ``ConditionLog`` logs a warning when a store enters a condition and one line when it
recovers, not once per failing request.
"""

from __future__ import annotations

import logging
import sqlite3
import threading

import redis.exceptions

from textgen.errors import InsufficientStorageError, StoreUnavailableError, TextGenError

logger = logging.getLogger(__name__)


class ConditionLog:
    """The current condition of each store (by name); logs only when it changes."""

    def __init__(self) -> None:
        self._current: dict[str, str] = {}
        self._lock = threading.Lock()

    def enter(self, store: str, condition: str, message: str) -> None:
        with self._lock:
            if self._current.get(store) == condition:
                return
            self._current[store] = condition
        logger.warning("%s (further failures for this reason are not logged until it changes)", message)

    def clear(self, store: str) -> None:
        if store not in self._current:  # the common case, without taking the lock
            return
        with self._lock:
            condition = self._current.pop(store, None)
        if condition is not None:
            logger.info("Job store %s works again (was: %s)", store, condition)

    def current(self, store: str) -> str | None:
        return self._current.get(store)


CONDITIONS = ConditionLog()


def sqlite_condition(error: sqlite3.Error, path: str) -> TextGenError | None:
    """The client error for an environmental SQLite failure on ``path``; None for anything else."""
    text = str(error).lower()
    if "disk is full" in text or "database or disk is full" in text:
        return InsufficientStorageError(
            f"The job store's disk is full ({path}); nothing new can be stored. Free space on that disk or "
            "move TEXTGEN_JOB_STORE to a larger one."
        )
    if "readonly" in text or "read-only" in text:
        return InsufficientStorageError(
            f"The job store file {path} cannot be written (read-only file or file system). Make it writable "
            "or point TEXTGEN_JOB_STORE at a writable path."
        )
    if "database is locked" in text or "database is busy" in text:
        return StoreUnavailableError(
            f"The job store file {path} stayed locked by another process past the busy timeout; retry after "
            "the time in the Retry-After header."
        )
    return None


def redis_condition(error: redis.exceptions.ResponseError, url: str) -> TextGenError | None:
    """The client error for an environmental Redis refusal; None for anything else."""
    text = str(error)
    # redis-py turns "-OOM ..." and "-READONLY ..." replies into these classes and drops the prefix.
    if isinstance(error, redis.exceptions.OutOfMemoryError) or text.startswith("OOM"):
        return InsufficientStorageError(
            f"Redis at {url} is out of memory (maxmemory reached) and refuses writes. Raise maxmemory, "
            "free memory, or shorten TEXTGEN_JOB_TTL_S so finished jobs are purged sooner."
        )
    if isinstance(error, redis.exceptions.ReadOnlyError) or text.startswith(("MISCONF", "READONLY")):
        return InsufficientStorageError(
            f"Redis at {url} refuses writes (a failed snapshot, or a read-only replica). Fix its persistence "
            "(disk space, permissions) or point TEXTGEN_JOB_STORE at the primary."
        )
    return None
