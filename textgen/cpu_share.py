"""Cores as the scarce resource: how many threads a model step may use, and whose step runs next.

Why. A model step runs on PyTorch's OpenMP team (fused.c's loops share it), and a team's threads meet at a
barrier after every parallel region: the step goes as fast as its slowest thread. A team as large as the
machine is right only while nothing else wants the cores. ``uvicorn main:app --workers 2`` on 2 cores ran
two full teams (C=16: ~790 tok/s with one worker, 19-55 tok/s with two), and a busy neighbour process took
a single server to ~3 tok/s: each team's second thread shares a core with someone else, runs half the
time, and the whole team waits for it at every barrier.

How many threads: measured, not guessed (``ThreadSizer``). At most every ``interval_s`` the step's thread
reads the busy time of the cores this process may run on (``/proc/stat``: user, nice, system, irq,
softirq, steal) and this process's own CPU time; the difference is what the other processes used, in
cores. A step then uses the cores they leave free, rounded down with a little headroom, at least one
and at most the cores this process may run on (its affinity mask and cgroup quota). Two busy workers
each see the other using about one core and settle at one thread each; when one goes idle, the other
sees the cores free and takes them all within one interval. A neighbour keeping one core busy leaves a
server one thread, which the kernel runs on the free core. When the others want far more than every core
(their threads in the run queue, where this process may use every core: twice the cores), nothing can be
left free and a step takes all cores: its threads then get their fair share of the CPU like everyone's.
``TEXTGEN_TORCH_THREADS`` fixes the count.

Whose turn (``CoreShare.turn``): several engines in one process (several models) take turns, one step at
a time, so only one OpenMP team works at once. The next turn goes to the waiting engine that has used the
least core time (start-time fair queueing, in seconds of steps), so two busy models each get about half of
the machine whatever their step lengths; an engine that was idle joins at the current virtual time (it
banks no credit), and an idle engine takes no turns, so it costs a busy one nothing. One engine alone
takes an uncontended lock per step (microseconds; a decode step is milliseconds).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

INTERVAL_S = 0.5  # how often the machine's load is re-read (one read costs tens of microseconds)
# Free cores are rounded down after adding this: a core that others keep 60% busy is not worth a thread
# (the team would wait for it at every barrier), one they use 30% of is.
HEADROOM = 0.35
# When the other processes want more than every core (a run queue longer than the machine), there is
# nothing to leave free: a step then takes all cores, and its threads get their fair share of CPU time
# like everyone's (measured on this machine at a load average of 11-15: one thread per step got half the
# throughput of two). Saturation is entered when the others' run queue reaches SATURATED_ENTER x cores
# and left below SATURATED_LEAVE x cores, well above what busy sibling workers and a load generator make
# (their event loops run now and then), and far enough apart that the count does not flip every interval.
SATURATED_ENTER = 2.0  # x cores: twice as many other threads wanting a core as there are cores
SATURATED_LEAVE = 1.5  # x cores
RUNNABLE_SMOOTHING = 0.3  # weight of each new run-queue sample (an instantaneous count, so noisy)
# /proc/stat's aggregate line: user nice system idle iowait irq softirq steal guest guest_nice. Busy is
# everything but idle and iowait (guest time is inside user already); steal is time the hypervisor gave
# another machine, so unavailable to us as well.
BUSY_FIELDS = (0, 1, 2, 5, 6, 7)
CHANGE_LOG_INTERVAL_S = 60.0  # thread-count changes logged at INFO at most this often, at DEBUG otherwise


@dataclass(frozen=True, slots=True)
class CpuReading:
    """Cumulative seconds at one moment: the machine's busy time over all cores, and this process's."""

    wall_s: float
    machine_busy_s: float
    own_s: float
    runnable: int | None = None  # other processes' threads running or ready to run now (procs_running less ours)


CpuProbe = Callable[[], CpuReading | None]


def read_proc_stat(path: Path = Path("/proc/stat"), cpus: frozenset[int] | None = None) -> tuple[float, int] | None:
    """The cumulative busy CPU seconds of ``cpus`` (their ``cpuN`` lines; None: the machine's aggregate
    line) and the machine's run queue (``procs_running``); None where /proc/stat cannot be read. Only the
    cores this process may run on matter: on a machine whose other cores belong to other cpusets, their
    load is no neighbour of ours."""
    try:
        text = path.read_bytes()
    except OSError:
        return None
    total = 0
    counted = 0
    runnable = -1
    for line in text.splitlines():
        fields = line.split()
        if not fields:
            continue
        if fields[0] == b"procs_running" and len(fields) == 2 and fields[1].isdigit():
            runnable = int(fields[1])
        if not fields[0].startswith(b"cpu"):
            continue
        name = fields[0][3:]
        if (cpus is None) != (name == b""):
            continue
        if cpus is not None and (not name.isdigit() or int(name) not in cpus):
            continue
        if len(fields) < 9:
            return None
        try:
            total += sum(int(fields[1 + field]) for field in BUSY_FIELDS)
        except ValueError:
            return None
        counted += 1
    if counted == 0:
        return None
    return total / os.sysconf("SC_CLK_TCK"), runnable


def proc_stat_probe(cpus: frozenset[int] | None = None) -> CpuProbe:
    """A probe of the cores in ``cpus`` (default: this process's affinity mask when the probe is made). The
    run queue is machine-wide, so it is used only where this process may run on every core."""
    watched = cpus if cpus is not None else frozenset(os.sched_getaffinity(0))
    whole_machine = len(watched) >= (os.cpu_count() or 0)

    def probe() -> CpuReading | None:
        found = read_proc_stat(cpus=watched)
        if found is None:
            return None
        busy, runnable = found
        others: int | None = None
        if whole_machine and runnable >= 0:
            # Below the line that ends saturation even counting all but this thread as others', the
            # exact count changes nothing: skip reading every thread's state (~25 us per thread).
            quiet = runnable - 1 < SATURATED_LEAVE * len(watched)
            others = runnable - (1 if quiet else own_running_threads())
        return CpuReading(
            wall_s=time.monotonic(),
            machine_busy_s=busy,
            own_s=time.process_time(),
            runnable=max(0, others) if others is not None else None,
        )

    return probe


def own_running_threads(tasks: str = "/proc/self/task") -> int:
    """This process's threads running or ready to run (state R), the calling one included (at least 1)."""
    running = 0
    try:
        names = os.listdir(tasks)
    except OSError:
        return 1
    for name in names:
        try:
            with open(f"{tasks}/{name}/stat", "rb", buffering=0) as task:
                stat = task.read(512)
        except OSError:
            continue  # the thread ended meanwhile
        end = stat.rfind(b")")  # "pid (name) state ...": the name may hold spaces and parentheses
        running += stat[end + 2 : end + 3] == b"R"
    return max(1, running)


def usable_cores(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """The cores this process may run on: its affinity mask, capped by a cgroup v2 CPU quota if one is set
    (a container limited to 1.5 CPUs on a 16-core host has 2 usable, not 16)."""
    cores = len(os.sched_getaffinity(0))
    quota = _cgroup_quota(cgroup_root / "cpu.max")
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def _cgroup_quota(path: Path) -> float | None:
    try:
        fields = path.read_text(encoding="ascii").split()
    except (OSError, UnicodeDecodeError):
        return None
    if len(fields) != 2 or fields[0] == "max":
        return None
    try:
        quota, period = int(fields[0]), int(fields[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def threads_for(cores: int, others_busy: float) -> int:
    """Threads for a step when other processes keep ``others_busy`` cores busy (see ``HEADROOM``)."""
    free = cores - max(0.0, others_busy)
    return max(1, min(cores, math.floor(free + HEADROOM)))


class ThreadSizer:
    """How many threads the next step uses: fixed, or sized to the cores other processes leave free.

    Called by whichever engine thread holds the turn, so it needs no lock of its own.
    """

    def __init__(
        self,
        cores: int,
        *,
        fixed: int | None = None,
        probe: CpuProbe | None = None,
        interval_s: float = INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if cores < 1 or (fixed is not None and fixed < 1):
            raise ValueError("cores and fixed threads must be >= 1")
        self.cores = cores
        self.fixed = fixed
        self._probe = (probe or proc_stat_probe()) if fixed is None else None
        self._interval_s = interval_s
        self._clock = clock
        self._last: CpuReading | None = None
        self._next_read = 0.0
        self._threads = fixed or cores
        self.others_busy = 0.0  # cores the other processes used over the last interval
        self.others_runnable = 0.0  # their threads wanting a core (the smoothed run queue, less ours)
        self.saturated = False  # the others want every core: nothing to leave free
        self._last_logged = -math.inf

    @property
    def adaptive(self) -> bool:
        return self._probe is not None

    @property
    def current(self) -> int:
        """The count the last step used (or will use, before the first)."""
        return self._threads

    def threads(self) -> int:
        """The thread count for a step starting now (re-measured at most every ``interval_s``)."""
        if self._probe is None:
            return self._threads
        now = self._clock()
        if now >= self._next_read:
            self._next_read = now + self._interval_s
            self._measure()
        return self._threads

    def _measure(self) -> None:
        assert self._probe is not None
        reading = self._probe()
        if reading is None:  # no /proc/stat: nothing to adapt to
            return
        last, self._last = self._last, reading
        if last is None:
            return
        wall = reading.wall_s - last.wall_s
        if wall <= 0:
            return
        others = (reading.machine_busy_s - last.machine_busy_s - (reading.own_s - last.own_s)) / wall
        self.others_busy = max(0.0, others)
        if reading.runnable is not None:
            self.others_runnable += RUNNABLE_SMOOTHING * (reading.runnable - self.others_runnable)
        line = (SATURATED_LEAVE if self.saturated else SATURATED_ENTER) * self.cores
        self.saturated = self.others_runnable >= line
        threads = self.cores if self.saturated else threads_for(self.cores, self.others_busy)
        if threads != self._threads:
            self._log_change(self._threads, threads)
            self._threads = threads

    def _log_change(self, before: int, after: int) -> None:
        now = self._clock()
        level = logging.INFO if now - self._last_logged >= CHANGE_LOG_INTERVAL_S else logging.DEBUG
        if level == logging.INFO:
            self._last_logged = now
        logger.log(
            level,
            "Model steps now use %d of %d cores' threads (was %d): other processes kept %.1f cores busy, "
            "%.1f of their threads wanting a core%s",
            after,
            self.cores,
            before,
            self.others_busy,
            self.others_runnable,
            " (more than the machine has: a fair share of every core)" if self.saturated else "",
        )


class Turns:
    """One engine's place in a ``CoreShare``: its used core time (virtual time) and its thread's count."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.virtual_s = 0.0  # seconds of steps taken, advanced from the share's virtual time when it joins
        self.steps = 0
        self.busy_s = 0.0  # wall seconds of its turns, for stats


def torch_set_threads(count: int) -> None:
    """Set the calling thread's OpenMP team size (PyTorch's and fused.c's parallel regions read it)."""
    import torch  # here, not at import: this base module must not load libgomp (textgen/openmp.py)

    torch.set_num_threads(count)


class CoreShare:
    """The process's cores, shared by its engines: one step at a time, fairly, on a sized team.

    Build one per process (the lifespan does, from the settings) and hand it to every engine: an engine
    registers with ``join(name)`` and wraps each step in ``with share.turn(turns) as threads:``.
    """

    def __init__(
        self,
        sizer: ThreadSizer,
        *,
        set_threads: Callable[[int], None] = torch_set_threads,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.sizer = sizer
        self._set_threads = set_threads
        self._clock = clock
        self._condition = threading.Condition()
        self._holder: Turns | None = None
        self._waiting: list[Turns] = []  # in arrival order: ties go to the earlier one
        self._virtual_s = 0.0  # the virtual time of the turn in service (start-time fair queueing)
        self._applied = threading.local()  # the count last set on each engine thread

    @classmethod
    def for_process(cls, torch_threads: int | None, adaptive: bool) -> CoreShare:
        """``torch_threads`` fixes the count; else ``adaptive`` sizes it to free cores, or all usable cores."""
        cores = usable_cores()
        if torch_threads is not None:
            sizer = ThreadSizer(cores, fixed=torch_threads)
        elif adaptive:
            sizer = ThreadSizer(cores)
        else:
            sizer = ThreadSizer(cores, fixed=cores)
        return cls(sizer)

    def describe(self) -> str:
        sizer = self.sizer
        if sizer.adaptive:
            return f"sized to the free cores (1-{sizer.cores}, re-measured every {INTERVAL_S:g} s)"
        return f"{sizer.fixed} (fixed)"

    def join(self, name: str) -> Turns:
        return Turns(name)

    def engines_changed(self, engines: Mapping[str, object]) -> None:
        """The model registry's hook (``CoreSharing``), called after each load or unload. The engines share
        this object from their construction on, so there is nothing to redistribute: it says who shares."""
        if len(engines) > 1:
            logger.info("%d models' engines share the cores, one step at a time: %s", len(engines), ", ".join(engines))

    @contextmanager
    def turn(self, turns: Turns) -> Iterator[int]:
        """Wait for this engine's turn, size the calling thread's team, yield the thread count, and
        account the turn's time when the block ends (normally or not)."""
        self._acquire(turns)
        started = self._clock()
        try:
            threads = self.sizer.threads()
            if getattr(self._applied, "threads", None) != threads:
                self._set_threads(threads)
                self._applied.threads = threads
            yield threads
        finally:
            self._release(turns, self._clock() - started)

    def _acquire(self, turns: Turns) -> None:
        with self._condition:
            if self._holder is None and not self._waiting:
                self._grant(turns)
                return
            turns.virtual_s = max(turns.virtual_s, self._virtual_s)  # an idle engine banks no credit
            self._waiting.append(turns)
            while self._holder is not None or self._next_waiting() is not turns:
                self._condition.wait()
            self._waiting.remove(turns)
            self._grant(turns)

    def _grant(self, turns: Turns) -> None:
        turns.virtual_s = max(turns.virtual_s, self._virtual_s)
        self._virtual_s = turns.virtual_s
        self._holder = turns

    def _next_waiting(self) -> Turns:
        return min(self._waiting, key=lambda waiting: waiting.virtual_s)  # min keeps the first of equals

    def _release(self, turns: Turns, elapsed_s: float) -> None:
        with self._condition:
            turns.virtual_s += elapsed_s
            turns.busy_s += elapsed_s
            turns.steps += 1
            self._holder = None
            if self._waiting:
                self._condition.notify_all()

    def stats(self) -> dict[str, float | int | bool]:
        """The policy and what it saw last (for logs and metrics)."""
        sizer = self.sizer
        return {
            "cores": sizer.cores,
            "threads": sizer.current,
            "adaptive": sizer.adaptive,
            "others_busy_cores": round(sizer.others_busy, 2),
            "others_runnable": round(sizer.others_runnable, 2),
            "saturated": sizer.saturated,
        }
