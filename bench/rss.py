"""Peak resident memory of a process tree, sampled from ``/proc`` (Linux) in a background thread."""

from __future__ import annotations

import threading
from pathlib import Path
from types import TracebackType

PROC = Path("/proc")
KIB_PER_MIB = 1024.0


def parse_vmrss_kib(status_text: str) -> int | None:
    """The ``VmRSS`` value (kB) of a ``/proc/<pid>/status`` text; None when absent (e.g. a zombie)."""
    for line in status_text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return None


def parse_ppid(stat_text: str) -> int | None:
    """The parent pid from a ``/proc/<pid>/stat`` text; the command name may hold spaces and ')'."""
    _, sep, rest = stat_text.rpartition(")")
    fields = rest.split()
    if not sep or len(fields) < 2:
        return None
    return int(fields[1])


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:  # the process exited between listing and reading
        return None


def descendant_pids(root: int, proc: Path = PROC) -> list[int]:
    """``root`` and every live descendant of it."""
    children: dict[int, list[int]] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        stat = _read(entry / "stat")
        ppid = parse_ppid(stat) if stat else None
        if ppid is not None:
            children.setdefault(ppid, []).append(int(entry.name))
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, []))
    return found


def tree_rss_kib(root: int, proc: Path = PROC) -> int | None:
    """Summed VmRSS of ``root`` and its descendants; None when ``root`` is gone."""
    total, seen_root = 0, False
    for pid in descendant_pids(root, proc):
        status = _read(proc / str(pid) / "status")
        rss = parse_vmrss_kib(status) if status else None
        if rss is not None:
            total += rss
            seen_root = seen_root or pid == root
    return total if seen_root else None


class PeakRssSampler:
    """Context manager sampling a process tree's RSS every ``interval_s`` and keeping the peak."""

    def __init__(self, pid: int | None, interval_s: float = 0.5, proc: Path = PROC) -> None:
        self._pid = pid
        self._interval_s = interval_s
        self._proc = proc
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._peak_kib: int | None = None

    @property
    def peak_mib(self) -> float | None:
        return None if self._peak_kib is None else self._peak_kib / KIB_PER_MIB

    def sample(self) -> None:
        if self._pid is None:
            return
        try:
            rss = tree_rss_kib(self._pid, self._proc)
        except OSError:  # /proc unavailable: not Linux
            return
        if rss is not None and (self._peak_kib is None or rss > self._peak_kib):
            self._peak_kib = rss

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self._interval_s):
                return

    def __enter__(self) -> PeakRssSampler:
        if self._pid is not None:
            self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
            self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()
