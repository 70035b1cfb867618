"""The one leased poll loop (``textgen.workers.loop.PollLoop``) on a fake timer: steps, wake-ups, the
store-condition and crash arms, lease renewal every third of a lease, and stopping. Nothing sleeps: the
fake timer releases a wait only when the test advances it, and the test waits on the steps themselves."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest

from textgen.errors import InsufficientStorageError, StoreUnavailableError
from textgen.workers.loop import PollLoop

SETTLE_S = 5.0  # the most any awaited step may take (a bound on a hang, never waited out when all is well)


class FakeTimer:
    """``wait(event, timeout_s)`` on a clock that moves only in ``advance``."""

    def __init__(self) -> None:
        self.now = 0.0
        self.timeouts: list[float] = []  # every timeout a loop waited with, in order
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    async def wait(self, event: asyncio.Event, timeout_s: float) -> bool:
        self.timeouts.append(timeout_s)
        if event.is_set():
            return True
        timer: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sleepers.append((self.now + timeout_s, timer))
        woken = asyncio.ensure_future(event.wait())
        try:
            await asyncio.wait({timer, woken}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            woken.cancel()
            self._sleepers = [(at, f) for at, f in self._sleepers if f is not timer]
        return event.is_set()

    def advance(self, seconds: float) -> None:
        self.now += seconds
        for at, timer in self._sleepers:
            if at <= self.now and not timer.done():
                timer.set_result(None)

    def waiting(self) -> int:
        return len(self._sleepers)


class Steps:
    """A step that reports each call on a queue and does what the test queued for it."""

    def __init__(self) -> None:
        self.calls: asyncio.Queue[int] = asyncio.Queue()
        self.count = 0
        self.plan: list[BaseException | bool] = []  # what the next calls raise or return (then False)

    async def __call__(self) -> bool:
        self.count += 1
        self.calls.put_nowait(self.count)
        outcome = self.plan.pop(0) if self.plan else False
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def next(self) -> int:
        return await asyncio.wait_for(self.calls.get(), SETTLE_S)

    def none_pending(self) -> bool:
        return self.calls.empty()


@pytest.fixture
def timer() -> FakeTimer:
    return FakeTimer()


@pytest.fixture
async def loops() -> AsyncIterator[list[PollLoop]]:
    started: list[PollLoop] = []
    yield started
    for loop in started:
        await loop.stop()


async def until_waiting(timer: FakeTimer, n: int = 1) -> None:
    """Let the loop's tasks run until ``n`` of them wait on the timer (each does within a few switches)."""
    for _ in range(1000):
        if timer.waiting() >= n:
            return
        await asyncio.sleep(0)  # a task switch, not time: the loop runs on the fake timer
    raise AssertionError(f"{n} task(s) never waited on the timer")


async def test_a_step_runs_at_start_then_every_poll_interval_and_at_once_when_notified(
    timer: FakeTimer, loops: list[PollLoop]
) -> None:
    steps = Steps()
    loop = PollLoop("test-loop", steps, poll_interval_s=30.0, wait=timer.wait)
    loops.append(loop)
    loop.start()
    assert await steps.next() == 1
    await until_waiting(timer)
    assert timer.timeouts == [30.0]
    timer.advance(29.0)
    await until_waiting(timer)
    assert steps.none_pending()  # the interval has not passed
    timer.advance(1.0)
    assert await steps.next() == 2
    await until_waiting(timer)
    loop.notify()  # e.g. a job was just submitted
    assert await steps.next() == 3
    assert loop.polls >= 2


async def test_a_step_with_more_work_is_followed_at_once(timer: FakeTimer, loops: list[PollLoop]) -> None:
    steps = Steps()
    steps.plan = [True, True, False]
    loop = PollLoop("test-loop", steps, poll_interval_s=30.0, wait=timer.wait)
    loops.append(loop)
    loop.start()
    for expected in (1, 2, 3):
        assert await steps.next() == expected
    await until_waiting(timer)
    assert timer.timeouts == [30.0]  # the three steps ran back to back; only the last one waits


async def test_store_conditions_are_left_to_the_store_and_the_loop_goes_on(
    timer: FakeTimer, loops: list[PollLoop], caplog: pytest.LogCaptureFixture
) -> None:
    steps = Steps()
    steps.plan = [StoreUnavailableError(), InsufficientStorageError("disk full")]
    loop = PollLoop("test-loop", steps, poll_interval_s=1.0, wait=timer.wait)
    loops.append(loop)
    with caplog.at_level(logging.DEBUG, logger="textgen.workers.loop"):
        loop.start()
        assert await steps.next() == 1
        await until_waiting(timer)
        timer.advance(1.0)
        assert await steps.next() == 2
        await until_waiting(timer)
        timer.advance(1.0)
        assert await steps.next() == 3
    assert [r for r in caplog.records if r.name == "textgen.workers.loop"] == []  # the store logged them once


async def test_an_unexpected_failure_is_logged_with_its_traceback_and_the_loop_goes_on(
    timer: FakeTimer, loops: list[PollLoop], caplog: pytest.LogCaptureFixture
) -> None:
    steps = Steps()
    steps.plan = [RuntimeError("boom")]
    loop = PollLoop("test-loop", steps, poll_interval_s=1.0, wait=timer.wait)
    loops.append(loop)
    with caplog.at_level(logging.ERROR, logger="textgen.workers.loop"):
        loop.start()
        assert await steps.next() == 1
        await until_waiting(timer)
        timer.advance(1.0)
        assert await steps.next() == 2
    [record] = [r for r in caplog.records if r.name == "textgen.workers.loop"]
    assert "test-loop: iteration failed" in record.getMessage()
    assert record.exc_info is not None and "boom" in str(record.exc_info[1])


async def test_leases_are_renewed_every_third_of_a_lease_and_a_failed_round_does_not_stop_them(
    timer: FakeTimer, loops: list[PollLoop]
) -> None:
    steps, renewals = Steps(), Steps()
    renewals.plan = [StoreUnavailableError()]

    async def renew() -> None:
        await renewals()

    loop = PollLoop("test-loop", steps, poll_interval_s=100.0, renew=renew, lease_s=30.0, wait=timer.wait)
    loops.append(loop)
    loop.start()
    await steps.next()
    await until_waiting(timer, 2)  # the poll and the renewal both wait
    assert sorted(timer.timeouts) == [10.0, 100.0]
    timer.advance(9.9)
    await until_waiting(timer, 2)
    assert renewals.none_pending()
    timer.advance(0.1)
    assert await renewals.next() == 1  # failed (store unavailable): the next round still comes
    await until_waiting(timer, 2)
    timer.advance(10.0)
    assert await renewals.next() == 2
    await until_waiting(timer, 2)
    assert loop.renewals == 2
    assert steps.none_pending()  # renewing never ran a step


async def test_stop_ends_both_tasks_without_waiting_out_the_timer(timer: FakeTimer) -> None:
    steps = Steps()

    async def renew() -> None:
        raise AssertionError("no renewal is due before stop")

    loop = PollLoop("test-loop", steps, poll_interval_s=100.0, renew=renew, lease_s=300.0, wait=timer.wait)
    loop.start()
    await steps.next()
    await until_waiting(timer, 2)
    await asyncio.wait_for(loop.stop(), SETTLE_S)  # the timer never moved
    assert loop.stopping
    loop.notify()
    assert steps.none_pending()  # nothing runs after stop
    await loop.stop()  # idempotent


async def test_a_step_in_progress_is_cancelled_by_stop(timer: FakeTimer) -> None:
    entered, cancelled = asyncio.Event(), asyncio.Event()

    async def hangs() -> bool:
        entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return False

    loop = PollLoop("test-loop", hangs, poll_interval_s=1.0, wait=timer.wait)
    loop.start()
    await asyncio.wait_for(entered.wait(), SETTLE_S)
    await asyncio.wait_for(loop.stop(), SETTLE_S)
    assert cancelled.is_set()


def test_renewing_needs_a_lease() -> None:
    async def renew() -> None: ...

    async def step() -> bool:
        return False

    with pytest.raises(ValueError, match="lease_s"):
        PollLoop("test-loop", step, poll_interval_s=1.0, renew=renew)
