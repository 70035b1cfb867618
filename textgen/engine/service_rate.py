"""Retry-After that predicts: how long until the queue ahead of a refused request has moved.

A request refused with 503 (queue full) could start once every request waiting before it has been
admitted and one more slot has freed: ``needed = waiting - free slots + 1`` completions. At the engine's
measured completion rate that takes ``needed / rate`` seconds; that is what ``Retry-After`` advertises
(clamped to [``RETRY_AFTER_MIN_S``, ``RETRY_AFTER_MAX_S``], and rounded up to whole seconds where the
header is written, ``textgen.api.errors.retry_after_headers``). A client that obeys it (the ``openai``
client does, exactly) comes back when the queue it was refused behind has drained, not in a herd a
second later, nor minutes late.

The rate is completions (a slot freed: finished, failed or cancelled) per second over a sliding window
(``window_s``), counted from when the engine last became *saturated* (every slot taken or requests
waiting): while it is, each slot frees as fast as the engine can work, so that count measures capacity,
not demand (pauses shorter than ``PAUSE_S`` do not end a period). With too
few completions since then it counts from when the engine last became busy; with too few of those, the
caller's fallback (token throughput and the mean output budget) applies. The clock is injected, so tests
drive it.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable

RETRY_AFTER_MIN_S = 1.0
RETRY_AFTER_MAX_S = 300.0  # past five minutes a prediction says little; the client should look elsewhere
WINDOW_S = 60.0
MIN_COMPLETIONS = 2  # one completion gives no interval to measure
# A pause shorter than this does not end a busy or saturated period: between a slot freeing and the next
# request arriving (a client's round trip) an engine is briefly idle without its pace having changed.
PAUSE_S = 1.0


class _Period:
    """Since when a condition (busy, saturated) has held, ignoring pauses shorter than PAUSE_S."""

    def __init__(self) -> None:
        self.since: float | None = None
        self._paused_at: float | None = None

    def update(self, holds: bool, now: float) -> None:
        if not holds:
            if self.since is not None and self._paused_at is None:
                self._paused_at = now
            return
        if self.since is None or (self._paused_at is not None and now - self._paused_at >= PAUSE_S):
            self.since = now
        self._paused_at = None

    def start(self, now: float) -> float | None:
        """Where to count from now: None once the condition has been off for PAUSE_S or more."""
        if self.since is None or (self._paused_at is not None and now - self._paused_at >= PAUSE_S):
            return None
        return self.since


class ServiceRate:
    """Completions per second over a sliding window; thread-safe (the inference thread records, the event
    loop asks)."""

    def __init__(
        self, window_s: float = WINDOW_S, clock: Callable[[], float] = time.monotonic, max_samples: int = 4096
    ) -> None:
        self._window_s = window_s
        self._clock = clock
        self._lock = threading.Lock()
        self._finished: deque[float] = deque(maxlen=max_samples)
        self._busy = _Period()
        self._saturated = _Period()

    def observe(self, *, busy: bool, saturated: bool) -> None:
        """The engine's state now: busy (anything running or waiting), saturated (every slot taken, or
        requests waiting for one)."""
        with self._lock:
            now = self._clock()
            self._busy.update(busy, now)
            self._saturated.update(saturated, now)

    def finished(self, count: int = 1) -> None:
        """``count`` requests left their slots (finished, failed or cancelled)."""
        if count <= 0:
            return
        with self._lock:
            now = self._clock()
            self._finished.extend([now] * count)

    def completions_per_s(self) -> float | None:
        """The measured rate, or None while too few completions were seen to measure one."""
        with self._lock:
            now = self._clock()
            floor = now - self._window_s
            for since in (self._saturated.start(now), self._busy.start(now)):
                if since is None:
                    continue
                start = max(since, floor)
                count = sum(1 for at in self._finished if at > start)
                if count >= MIN_COMPLETIONS and now > start:
                    return count / (now - start)
            return None


def completions_needed(waiting: int, free_slots: int) -> int:
    """Completions before a request arriving now could start: everyone waiting ahead, then one slot."""
    return max(1, waiting - free_slots + 1)


def predicted_wait_s(needed: int, rate: float | None, fallback_rate: float | None = None) -> float:
    """Seconds for ``needed`` completions at the measured rate (else the fallback rate), clamped; unrounded
    (the header rounds up). With no rate at all, the minimum: nothing measured predicts anything longer."""
    per_s = rate if rate is not None and rate > 0 else fallback_rate
    if per_s is None or per_s <= 0 or not math.isfinite(per_s):
        return RETRY_AFTER_MIN_S
    return min(RETRY_AFTER_MAX_S, max(RETRY_AFTER_MIN_S, needed / per_s))
