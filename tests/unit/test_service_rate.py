"""Retry-After that predicts (textgen.engine.service_rate), on a driven clock: the measured completion
rate, the advertised wait, and a fake engine with a deterministic service time whose advertised wait is
held against the moment its queue ahead has actually drained."""

from __future__ import annotations

import heapq
import math
from collections import deque

import pytest

from textgen.api.errors import retry_after_headers
from textgen.engine.service_rate import (
    RETRY_AFTER_MAX_S,
    RETRY_AFTER_MIN_S,
    WINDOW_S,
    ServiceRate,
    completions_needed,
    predicted_wait_s,
)
from textgen.errors import QueueFullError

# The advertised wait must lie within this factor of the real one (both ways).
FACTOR = 2.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_no_rate_until_two_completions() -> None:
    clock = Clock()
    rate = ServiceRate(clock=clock)
    rate.observe(busy=True, saturated=True)
    assert rate.completions_per_s() is None
    clock.now += 2
    rate.finished()
    assert rate.completions_per_s() is None
    clock.now += 2
    rate.finished()
    assert rate.completions_per_s() == pytest.approx(2 / 4)


def test_rate_counts_from_saturation_not_from_light_load_before_it() -> None:
    """A minute of light load (one completion every 10 s) then a full queue served at 4/s: the rate is
    the capacity seen while saturated, not the average that demand made of the whole window."""
    clock = Clock()
    rate = ServiceRate(clock=clock)
    rate.observe(busy=True, saturated=False)
    for _ in range(6):
        clock.now += 10
        rate.finished()
    rate.observe(busy=True, saturated=True)
    for _ in range(8):
        clock.now += 0.25
        rate.finished()
    assert rate.completions_per_s() == pytest.approx(4.0)


def test_rate_falls_back_to_the_busy_period_then_forgets_past_the_window() -> None:
    clock = Clock()
    rate = ServiceRate(clock=clock)
    rate.observe(busy=True, saturated=False)
    for _ in range(2 * int(WINDOW_S)):  # one per second for two windows
        clock.now += 1
        rate.finished()
    assert rate.completions_per_s() == pytest.approx(1.0, rel=0.05)
    rate.observe(busy=True, saturated=True)  # saturated just now: too few completions since, so busy counts
    assert rate.completions_per_s() == pytest.approx(1.0, rel=0.05)
    for _ in range(int(WINDOW_S)):  # then a window at 2/s, saturated: the first rate is forgotten
        clock.now += 0.5
        rate.finished()
    clock.now += 0.5
    rate.finished()
    assert rate.completions_per_s() == pytest.approx(2.0, rel=0.05)


def test_idle_resets_the_measurement() -> None:
    clock = Clock()
    rate = ServiceRate(clock=clock)
    rate.observe(busy=True, saturated=True)
    for _ in range(4):
        clock.now += 1
        rate.finished()
    rate.observe(busy=False, saturated=False)
    clock.now += 30
    rate.observe(busy=True, saturated=True)  # a new burst: an hour-old pace says nothing about it
    assert rate.completions_per_s() is None


def test_predicted_wait_is_clamped_and_the_header_rounds_up() -> None:
    assert completions_needed(waiting=8, free_slots=0) == 9
    assert completions_needed(waiting=0, free_slots=3) == 1
    assert predicted_wait_s(9, 2.0) == 4.5
    assert predicted_wait_s(9, None, fallback_rate=3.0) == 3.0
    assert predicted_wait_s(9, None) == RETRY_AFTER_MIN_S  # nothing measured: retry soon and measure
    assert predicted_wait_s(1, 100.0) == RETRY_AFTER_MIN_S
    assert predicted_wait_s(10_000, 1.0) == RETRY_AFTER_MAX_S
    assert retry_after_headers(QueueFullError(retry_after_s=4.5)) == {"Retry-After": "5"}
    assert retry_after_headers(QueueFullError(retry_after_s=4.0)) == {"Retry-After": "4"}


class FakeEngine:
    """A queue in front of ``slots`` servers, each request taking exactly ``service_s``, driven by a fake
    clock from one completion to the next; it measures itself with a real ``ServiceRate``."""

    def __init__(self, slots: int, max_waiting: int, service_s: float, clock: Clock) -> None:
        self.slots, self.max_waiting, self.service_s, self.clock = slots, max_waiting, service_s, clock
        self.rate = ServiceRate(clock=clock)
        self.running: list[float] = []  # end times (a heap)
        self.waiting: deque[int] = deque()
        self.completions: list[float] = []
        self._next_id = 0

    def _observe(self) -> None:
        saturated = len(self.running) >= self.slots or bool(self.waiting)
        self.rate.observe(busy=bool(self.running or self.waiting), saturated=saturated)

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.slots:
            self.waiting.popleft()
            heapq.heappush(self.running, self.clock.now + self.service_s)
        self._observe()

    def submit(self) -> None:
        """Queue one request, or QueueFullError with the engine's advertised wait (the scheduler's rule)."""
        free = self.slots - len(self.running)
        if len(self.waiting) >= self.max_waiting + free:
            needed = completions_needed(len(self.waiting), free)
            raise QueueFullError(retry_after_s=predicted_wait_s(needed, self.rate.completions_per_s()))
        self.waiting.append(self._next_id)
        self._next_id += 1
        self._admit()

    def run_until(self, until: float) -> None:
        """Serve until ``until``; clients waiting to get in take every freed place at once."""
        while self.running and self.running[0] <= until:
            self.clock.now = heapq.heappop(self.running)
            self.completions.append(self.clock.now)
            self.rate.finished()
            self._admit()
            self.fill()
        self.clock.now = max(self.clock.now, until)

    def nth_completion_after_now(self, n: int) -> float:
        """When the n-th completion from now happens if nobody else arrives (worked out on copies: the
        engine and its measurements are left as they are)."""
        running, waiting = list(self.running), len(self.waiting)
        at = self.clock.now
        for _ in range(n):
            at = heapq.heappop(running)
            if waiting:
                waiting -= 1
                heapq.heappush(running, at + self.service_s)
        return at

    def fill(self) -> QueueFullError:
        """Submit until refused; the refusal."""
        while True:
            try:
                self.submit()
            except QueueFullError as refused:
                return refused


@pytest.mark.parametrize(
    ("slots", "max_waiting", "service_s"),
    [(1, 0, 2.0), (2, 0, 7.0), (2, 4, 3.0), (8, 32, 20.0), (64, 256, 45.0), (4, 100, 0.5)],
)
def test_advertised_wait_matches_when_the_queue_ahead_drains(slots: int, max_waiting: int, service_s: float) -> None:
    """Clients keep the queue full; at several moments a new request is refused. The real wait is when the
    requests waiting ahead of it have all started and a slot is free for it (the needed-th completion
    after the refusal). Where that takes at least two rounds of the slots, the advertised wait lies within
    FACTOR of it, both ways; with a shorter queue the phase of the running requests (unknown: they may stop
    at any token) decides, and the advertised wait is at most FACTOR service times."""
    clock = Clock()
    engine = FakeEngine(slots, max_waiting, service_s, clock)
    engine.fill()
    checked = 0
    for step in range(1, 40):
        engine.run_until(clock.now + service_s * 0.37 * step / 10)  # arbitrary phases against the service time
        refused = engine.fill()
        if engine.rate.completions_per_s() is None:
            continue  # still cold (no completions measured yet): the minimum is advertised, checked above
        needed = max_waiting + 1  # everyone waiting ahead, then one slot
        real = engine.nth_completion_after_now(needed) - clock.now
        advertised = refused.retry_after_s
        assert advertised is not None
        header = int(retry_after_headers(refused)["Retry-After"])
        if needed >= 2 * slots:
            assert real / FACTOR <= advertised <= real * FACTOR or (
                real < RETRY_AFTER_MIN_S and advertised == RETRY_AFTER_MIN_S
            ), (advertised, real)
        else:
            assert real <= service_s and advertised <= max(FACTOR * service_s, RETRY_AFTER_MIN_S), (advertised, real)
        assert header == math.ceil(advertised)
        checked += 1
    assert checked >= 20
