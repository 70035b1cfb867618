"""Cores as the scarce resource (textgen/cpu_share.py): the thread count follows the cores other processes
leave free, and engines in one process take turns fairly by the core time they used. Throughput under
--workers 2 and beside a busy neighbour is measured by bench/cpu_share.py, not timed here."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.waiting import wait_until
from textgen.cpu_share import (
    CoreShare,
    CpuReading,
    ThreadSizer,
    Turns,
    own_running_threads,
    proc_stat_probe,
    read_proc_stat,
    threads_for,
    usable_cores,
)
from textgen.engine.scheduler import BatchedEngine
from textgen.engine.types import (
    EngineLimits,
    GenerationRequest,
    SamplingParams,
    SpeculationMode,
    SpeculationSettings,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeMachine:
    """Cumulative busy seconds: ``advance`` says how many cores others and this process kept busy."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.busy = 0.0
        self.own = 0.0
        self.reads = 0

    def advance(self, seconds: float, others: float, own: float) -> None:
        self.clock.now += seconds
        self.busy += seconds * (others + own)
        self.own += seconds * own

    def probe(self) -> CpuReading:
        self.reads += 1
        return CpuReading(self.clock.now, self.busy, self.own)


@pytest.mark.parametrize(
    ("cores", "others", "threads"),
    [(2, 0.0, 2), (2, 0.2, 2), (2, 0.7, 1), (2, 1.0, 1), (2, 3.5, 1), (16, 8.2, 8), (16, -1.0, 16)],
)
def test_a_step_uses_the_cores_others_leave_free(cores: int, others: float, threads: int) -> None:
    assert threads_for(cores, others) == threads


def test_the_sizer_follows_the_neighbours_load_once_per_interval() -> None:
    clock = FakeClock()
    machine = FakeMachine(clock)
    sizer = ThreadSizer(2, probe=machine.probe, interval_s=0.5, clock=clock)
    assert sizer.threads() == 2  # the first reading is only a baseline
    machine.advance(0.5, others=1.0, own=1.0)  # a neighbour keeps one core busy
    assert sizer.threads() == 1 and sizer.others_busy == pytest.approx(1.0)
    machine.advance(0.2, others=0.0, own=1.0)
    reads = machine.reads
    assert sizer.threads() == 1 and machine.reads == reads  # not re-read within the interval
    machine.advance(0.4, others=0.0, own=1.0)  # the neighbour stopped: ours takes both cores again
    assert sizer.threads() == 2


def test_two_sizers_sharing_a_machine_settle_at_one_thread_each() -> None:
    """Two busy workers on 2 cores: each sees the other's use as a neighbour's; idle, the other takes both."""
    clock = FakeClock()
    first, second = FakeMachine(clock), FakeMachine(clock)
    sizers = [ThreadSizer(2, probe=m.probe, interval_s=0.5, clock=clock) for m in (first, second)]
    for sizer in sizers:
        sizer.threads()
    for _ in range(4):  # each runs as many cores as threads, shared fairly by the kernel
        a, b = (sizer.current for sizer in sizers)
        share = min(1.0, 2.0 / (a + b))
        clock.now += 0.5
        first.busy += 0.5 * (a + b) * share
        second.busy += 0.5 * (a + b) * share
        first.own += 0.5 * a * share
        second.own += 0.5 * b * share
        for sizer in sizers:
            sizer.threads()
    assert [sizer.current for sizer in sizers] == [1, 1]
    clock.now += 0.5  # the second goes idle
    first.busy += 0.5
    first.own += 0.5
    second.busy += 0.5
    assert sizers[0].threads() == 2


def test_a_fixed_count_never_reads_the_machine() -> None:
    machine = FakeMachine(FakeClock())
    sizer = ThreadSizer(8, fixed=3, probe=machine.probe)
    assert sizer.threads() == 3 and not sizer.adaptive and machine.reads == 0
    with pytest.raises(ValueError):
        ThreadSizer(2, fixed=0)


def test_proc_stat_busy_time_counts_everything_but_idle_and_iowait(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal guest guest_nice (in clock ticks)
    stat.write_text(
        "cpu  160 10 70 9000 300 5 5 30 0 0\n"
        "cpu0 100 10 50 4500 300 5 5 30 0 0\n"
        "cpu1 60 0 20 4500 0 0 0 0 0 0\n"
        "intr 1 2 3\n"
        "procs_running 7\n"
    )
    tick = os.sysconf("SC_CLK_TCK")
    assert read_proc_stat(stat) == (pytest.approx(280 / tick), 7)  # the aggregate line, the run queue
    assert read_proc_stat(stat, frozenset({0})) == (pytest.approx(200 / tick), 7)  # only the cores we may use
    assert read_proc_stat(stat, frozenset({0, 1})) == (pytest.approx(280 / tick), 7)
    assert read_proc_stat(stat, frozenset({7})) is None
    stat.write_text("cpu  1 2 3 4 5 6 7 8 9 10\n")
    assert read_proc_stat(stat) == (pytest.approx(27 / tick), -1)  # no run queue line
    stat.write_text("intr 1 2 3\n")
    assert read_proc_stat(stat) is None
    stat.write_text("cpu  1 2\n")
    assert read_proc_stat(stat) is None
    assert read_proc_stat(tmp_path / "missing") is None
    assert read_proc_stat(cpus=frozenset(os.sched_getaffinity(0))) is not None  # this machine's own
    reading = proc_stat_probe()()
    assert reading is not None and reading.runnable is not None and reading.runnable >= 0  # ours excluded


def test_a_saturated_machine_gets_every_core_and_no_flapping() -> None:
    """Others wanting far more than every core: nothing to leave free, so a step takes all cores (a fair
    share of each); it stays so until their demand falls clearly, and sibling workers never trigger it."""
    clock = FakeClock()
    machine = FakeMachine(clock)
    runnable = [0]

    def probe() -> CpuReading:
        reading = machine.probe()
        return CpuReading(reading.wall_s, reading.machine_busy_s, reading.own_s, runnable=runnable[0])

    sizer = ThreadSizer(2, probe=probe, interval_s=0.5, clock=clock)
    sizer.threads()
    runnable[0] = 2  # a busy sibling worker (its step and its event loop) and the load generator
    for _ in range(20):
        machine.advance(0.5, others=1.0, own=1.0)
        sizer.threads()
    assert sizer.current == 1 and not sizer.saturated
    runnable[0] = 12  # a dozen threads want the two cores
    for _ in range(3):
        machine.advance(0.5, others=1.8, own=0.2)
        sizer.threads()
    assert sizer.saturated and sizer.current == 2
    runnable[0] = 4  # fewer, still clearly more than the machine: no flip back yet
    machine.advance(0.5, others=1.4, own=0.6)
    assert sizer.threads() == 2
    runnable[0] = 1
    for _ in range(12):
        machine.advance(0.5, others=1.0, own=1.0)
        sizer.threads()
    assert not sizer.saturated and sizer.current == 1


def test_this_process_counts_its_own_running_threads(tmp_path: Path) -> None:
    assert own_running_threads() >= 1  # the calling thread runs
    for tid, state in (("1", "S"), ("2", "R"), ("3", "R"), ("4", "D")):
        (tmp_path / tid).mkdir()
        (tmp_path / tid / "stat").write_bytes(f"{tid} (py thread (x)) {state} 1 2 3".encode())
    (tmp_path / "5").mkdir()  # a thread that ended between the listing and the read
    assert own_running_threads(str(tmp_path)) == 2
    assert own_running_threads(str(tmp_path / "missing")) == 1


def test_usable_cores_honour_a_cgroup_quota(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    assert usable_cores(tmp_path) == affinity  # no cpu.max file
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cores(tmp_path) == affinity
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a CPU still gets a thread
    assert usable_cores(tmp_path) == 1
    (tmp_path / "cpu.max").write_text("garbage\n")
    assert usable_cores(tmp_path) == affinity


# --- turns --------------------------------------------------------------------------------------------


def fixed_share(clock: FakeClock, threads: int = 2) -> tuple[CoreShare, list[tuple[str, int]]]:
    applied: list[tuple[str, int]] = []
    share = CoreShare(
        ThreadSizer(threads, fixed=threads),
        set_threads=lambda count: applied.append((threading.current_thread().name, count)),
        clock=clock,
    )
    return share, applied


def test_each_engine_thread_sets_its_own_team_size_once() -> None:
    share, applied = fixed_share(FakeClock())
    turns = share.join("a")
    for _ in range(3):
        with share.turn(turns) as threads:
            assert threads == 2
    # a second thread: its OpenMP team size is its own, so it is set there too
    done: list[int] = []

    def step() -> None:
        with share.turn(turns) as threads:
            done.append(threads)

    other = threading.Thread(target=step, name="other-engine")
    other.start()
    other.join(5)
    assert done == [2]
    assert applied == [(threading.current_thread().name, 2), ("other-engine", 2)]
    assert turns.steps == 4


def hold_until(share: CoreShare, turns: Turns, release: threading.Event) -> threading.Thread:
    entered = threading.Event()

    def hold() -> None:
        with share.turn(turns):
            entered.set()
            release.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    assert entered.wait(10)
    return thread


def queue_turn(share: CoreShare, turns: Turns, order: list[str]) -> threading.Thread:
    def take() -> None:
        with share.turn(turns):
            order.append(turns.name)

    thread = threading.Thread(target=take)
    thread.start()
    return thread


async def test_the_next_turn_goes_to_the_engine_that_used_the_least_time() -> None:
    clock = FakeClock()
    share, _ = fixed_share(clock)
    heavy, light, holder = share.join("heavy"), share.join("light"), share.join("holder")
    for turns, cost in ((heavy, 5.0), (light, 1.0)):
        with share.turn(turns):
            clock.now += cost
    release = threading.Event()
    held = hold_until(share, holder, release)
    order: list[str] = []
    waiting = [queue_turn(share, heavy, order)]  # heavy arrives first
    await wait_until(lambda: len(share._waiting) == 1)
    waiting.append(queue_turn(share, light, order))
    await wait_until(lambda: len(share._waiting) == 2)
    release.set()
    for thread in [held, *waiting]:
        thread.join(10)
    assert order == ["light", "heavy"]


async def test_an_engine_back_from_idle_banks_no_credit() -> None:
    """An engine idle for a long time joins at the current virtual time: it does not then hold the cores
    for as long as it was away."""
    clock = FakeClock()
    share, _ = fixed_share(clock)
    busy, sleeper = share.join("busy"), share.join("sleeper")
    for _ in range(50):
        with share.turn(busy):
            clock.now += 1.0
    with share.turn(sleeper):
        clock.now += 1.0
    assert sleeper.virtual_s >= busy.virtual_s - 1.0


async def test_two_busy_engines_split_the_time_whatever_their_step_lengths() -> None:
    """Steps of 1 s and 3 s (fake clock), always contending: each engine gets about half the time."""
    clock = FakeClock()
    share, _ = fixed_share(clock)
    engines = {"short": (share.join("short"), 1.0), "long": (share.join("long"), 3.0)}
    stop = threading.Event()

    def run(turns: Turns, cost: float) -> None:
        while not stop.is_set():
            with share.turn(turns):
                # keep the other engine waiting before this step ends, so every release is contended
                for _ in range(1000):
                    if share._waiting or stop.is_set():
                        break
                    threading.Event().wait(0.005)
                clock.now += cost
                if clock.now >= 120:
                    stop.set()

    threads = [threading.Thread(target=run, args=pair) for pair in engines.values()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    short, long = engines["short"][0], engines["long"][0]
    assert short.steps > 2 * long.steps  # several short steps per long one
    assert abs(short.busy_s - long.busy_s) <= 6.0  # equal time, within two long steps
    assert short.busy_s + long.busy_s >= 120


# --- in the engine ------------------------------------------------------------------------------------


@pytest.fixture
def counted_share() -> Iterator[tuple[CoreShare, list[tuple[str, int]]]]:
    share, applied = fixed_share(FakeClock(), threads=1)
    yield share, applied


async def test_two_engines_of_one_process_take_turns_on_one_share(
    tiny_loaded: Any, counted_share: tuple[CoreShare, list[tuple[str, int]]]
) -> None:
    share, applied = counted_share
    # one token per step (no drafts), so the steps count the turns
    limits = EngineLimits(max_new_tokens_limit=64, speculation=SpeculationSettings(SpeculationMode.OFF))
    engines = [BatchedEngine(tiny_loaded, limits, warmup=False, cores=share) for _ in range(2)]
    for engine in engines:
        await engine.start()
    try:
        params = SamplingParams(max_new_tokens=12, ignore_eos=True, temperature=0.0)
        results = await asyncio.gather(
            *(engine.submit(GenerationRequest("Once upon a time", params)).result() for engine in engines for _ in "ab")
        )
    finally:
        for engine in engines:
            await engine.stop(0)
    assert all(result.completion_tokens == 12 for result in results)
    assert results[0].text == results[2].text  # greedy, the same model: the turns changed nothing
    assert all(turns.steps >= 12 for turns in (engines[0]._turns, engines[1]._turns) if turns is not None)
    assert sorted(name for name, _ in applied) == ["textgen-engine", "textgen-engine"]  # once per engine thread


class RecordedWaits(threading.Condition):
    """An engine's work condition that records each wait's timeout (None: until notified)."""

    def __init__(self, lock: Any) -> None:
        super().__init__(lock)
        self.timeouts: list[float | None] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.timeouts.append(timeout)
        return super().wait(timeout)


async def test_an_idle_engine_beside_a_busy_one_takes_no_turns_and_no_timed_wake_ups(
    tiny_loaded: Any, counted_share: tuple[CoreShare, list[tuple[str, int]]]
) -> None:
    """A second model nobody uses must cost the busy one nothing: its thread sleeps until work or a stop
    is notified (a timed wake-up would take the GIL and a core now and then), and it takes no turns."""
    share, _applied = counted_share
    limits = EngineLimits(max_new_tokens_limit=64, speculation=SpeculationSettings(SpeculationMode.OFF))
    busy, idle = (BatchedEngine(tiny_loaded, limits, warmup=False, cores=share) for _ in range(2))
    waits = RecordedWaits(idle._lock)
    idle._work_available = waits
    for engine in (busy, idle):
        await engine.start()
    try:
        params = SamplingParams(max_new_tokens=12, ignore_eos=True, temperature=0.0)
        await asyncio.gather(*(busy.submit(GenerationRequest("Once upon a time", params)).result() for _ in "abc"))
        assert idle._turns is not None and idle._turns.steps == 0
        assert waits.timeouts == [None]  # asleep since it started, never woken
        woken = await idle.submit(GenerationRequest("Once upon a time", params)).result()  # a notify wakes it
        assert woken.completion_tokens == 12 and idle._turns.steps >= 12
        await wait_until(lambda: len(waits.timeouts) == 2)  # asleep again once done, still untimed
        assert waits.timeouts == [None, None]
    finally:
        for engine in (busy, idle):
            await engine.stop(0)


def test_the_policy_from_the_settings() -> None:
    cores = usable_cores()
    fixed = CoreShare.for_process(torch_threads=3, adaptive=True)
    assert fixed.describe() == "3 (fixed)" and fixed.stats()["threads"] == 3 and fixed.stats()["adaptive"] is False
    everything = CoreShare.for_process(torch_threads=None, adaptive=False)
    assert everything.describe() == f"{cores} (fixed)"
    adaptive = CoreShare.for_process(torch_threads=None, adaptive=True)
    assert adaptive.sizer.adaptive and adaptive.describe().startswith(f"sized to the free cores (1-{cores}")
    assert adaptive.stats() == {
        "cores": cores,
        "threads": cores,
        "adaptive": True,
        "others_busy_cores": 0.0,
        "others_runnable": 0.0,
        "saturated": False,
    }


def test_the_registry_hook_says_who_shares(caplog: pytest.LogCaptureFixture) -> None:
    share, _ = fixed_share(FakeClock())
    with caplog.at_level("INFO", logger="textgen.cpu_share"):
        share.engines_changed({"smol": object()})
        share.engines_changed({"smol": object(), "gemma": object()})
    assert [r.getMessage() for r in caplog.records] == [
        "2 models' engines share the cores, one step at a time: smol, gemma"
    ]
