"""Store errors that are the environment's, not ours, mapped to one clear answer and logged once.

A full disk under the SQLite file, a file that became read-only, a database locked past the busy
timeout, an unreachable Redis, a Redis server out of memory or refusing writes after a failed
snapshot: each becomes a client error naming the cause and the action (``InsufficientStorageError``
507, or ``StoreUnavailableError`` 503), instead of a 500 with a traceback per request.

``ConditionLog`` is the one place that logs them: one WARNING when a store enters a condition (naming
the cause and the fix), nothing while it lasts (the failed operations are counted), and one INFO line
when it clears, with how long it lasted and how many operations were refused meanwhile. A condition
that refuses writes (disk full, read-only, out of memory) clears only after a successful *write*: reads
keep working on a full disk, and letting them announce "works again" made the pair flap every poll.
An outage (Redis unreachable) clears once the store has answered for ``SETTLE_S`` without failing:
right after a restart each connection the pool kept from before fails once, which is not a new outage.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis.exceptions

from textgen.errors import InsufficientStorageError, StoreUnavailableError, TextGenError

logger = logging.getLogger(__name__)

# An outage counts as over once the store has answered for this long without a failure in between.
SETTLE_S = 2.0


@dataclass
class Condition:
    """What is wrong with one store right now."""

    kind: str  # a short, stable name ("unreachable", "InsufficientStorageError: database or disk is full")
    message: str  # the cause and the fix, as logged and as clients see it
    since: float  # monotonic clock
    writes_only: bool  # refuses writes only: clears after a successful write, not a read
    refused: int = 1  # failed operations since it started (the first included)
    answered_since: float | None = None  # an outage: the first success after the last failure


class ConditionLog:
    """The current condition of each store (by name); logs only when one starts, changes or clears."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._current: dict[str, Condition] = {}
        self._lock = threading.Lock()
        self._clock = clock

    def enter(self, store: str, kind: str, message: str, *, writes_only: bool = False) -> None:
        """An operation on ``store`` failed for ``kind``: logged if that is new, counted either way."""
        with self._lock:
            current = self._current.get(store)
            if current is not None and current.kind == kind:
                current.refused += 1
                current.answered_since = None
                return
            self._current[store] = Condition(kind, message, self._clock(), writes_only)
        logger.warning(
            "%s (logged once: further failures are counted, and one line follows when it clears)", message
        )

    def clear(self, store: str, *, wrote: bool = True) -> None:
        """An operation on ``store`` succeeded (``wrote``: it changed something). A condition that refuses
        writes stays until a write succeeds; an outage until the store has answered for ``SETTLE_S``."""
        if store not in self._current:  # the common case, without taking the lock
            return
        with self._lock:
            current = self._current.get(store)
            if current is None or (current.writes_only and not wrote):
                return
            now = self._clock()
            if not current.writes_only:
                if current.answered_since is None:
                    current.answered_since = now
                if now - current.answered_since < SETTLE_S:
                    return
            del self._current[store]
            lasted_s = (current.answered_since or now) - current.since
        logger.info(
            "Store %s works again after %.1f s (was: %s); %d operation(s) were refused meanwhile",
            store,
            lasted_s,
            current.kind,
            current.refused,
        )

    def current(self, store: str) -> str | None:
        condition = self._current.get(store)
        return None if condition is None else condition.kind

    def active(self) -> dict[str, Condition]:
        """Every store that is in a condition now (a copy), for /ready."""
        with self._lock:
            return dict(self._current)


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
