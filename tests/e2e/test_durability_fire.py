"""Durability under fire: kill -9 with 20 jobs in flight (twice), and job stores that cannot be written.

* ``kill -9`` while all 20 background jobs are queued or running (none finished yet), restart, ``kill -9``
  again half-way through, restart: all 20 succeed exactly once. A job's attempts are 1 plus the number
  of kills that caught it running; each job has one "succeeded" line over the three lives and no
  result is ever produced twice.
* A job store the process cannot write (a full disk, a read-only filesystem, a parent that is not a
  directory) stops the server at start-up with one clear CRITICAL line naming ``TEXTGEN_JOB_STORE``, a
  non-zero exit and no traceback, before the model is loaded; jobs already in a store on a full disk
  stay there untouched. The four such servers start side by side (``failed_starts``), each test then
  checks its own.

The full disk is a file-size limit (``RLIMIT_FSIZE``) on the server process: Python ignores SIGXFSZ, so a
write past the limit fails with EFBIG, which is what SQLite sees on a disk with no room left (it reports
it as "disk I/O error"). The limit is a few KiB rather than 0 because ``tempfile`` probes its directory
with a 4-byte write while the app is imported (in a plain subprocess: a fork server's child was imported
before the limit was set); anything SQLite writes (a page is 4 KiB) goes past it.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support.server import (
    Server,
    free_port,
    server_env,
    start_uvicorn,
    states_on_disk,
    submit_job,
    wait_until_terminal,
)
from tests.support.waiting import wait_until_sync
from textgen.jobs.sqlite_store import SQLiteJobStore

pytestmark = [pytest.mark.e2e, pytest.mark.server]

JOBS = 20
TOKENS = 48
CONCURRENCY = 4
ENV = {"TEXTGEN_JOB_CONCURRENCY": str(CONCURRENCY), "TEXTGEN_TORCH_THREADS": "1"}
# The third life runs every job left at once (one batch instead of rounds of four): it only has to finish them.
LAST_ENV = {**ENV, "TEXTGEN_JOB_CONCURRENCY": str(JOBS)}
FULL_DISK_BYTES = 2048
FAIL_FAST_S = 90.0  # imports only: the store is opened before the model is loaded


def wait_for_counts(client: httpx.Client, job_ids: list[str], ready: Callable[[Counter[str]], bool]) -> Counter[str]:
    counts: Counter[str] = Counter()

    def mixed() -> bool:
        listed = client.get("/jobs", params={"limit": 1000}).json()["jobs"]
        counts.clear()
        counts.update(job["state"] for job in listed if job["job_id"] in job_ids)
        return ready(counts)

    try:
        wait_until_sync(mixed, 120, "the wanted mix of job states")
    except AssertionError:
        pytest.fail(f"jobs never reached the wanted mix: {counts}")
    return counts


@pytest.mark.timeout(600)
def test_twenty_jobs_survive_two_kill_9s_and_finish_exactly_once(start_server: Callable[..., Server]) -> None:
    first = start_server(ENV)
    with first.client() as client:
        job_ids = [
            submit_job(
                client, {"prompt": f"Job {i}: describe a lighthouse", "max_new_tokens": TOKENS, "ignore_eos": True}
            )["job_id"]
            for i in range(JOBS)
        ]
        # First kill: every job queued or running, none finished (as soon as the runner has started some).
        wait_for_counts(client, job_ids, lambda c: c["running"] >= 1)
    assert first.kill9() == -signal.SIGKILL
    at_kill_1 = states_on_disk(first.job_store)
    assert set(at_kill_1) == set(job_ids)
    states_1 = Counter(state for state, _ in at_kill_1.values())
    assert set(states_1) <= {"queued", "running"} and states_1["running"] >= 1, states_1
    running_1 = {job_id for job_id, (state, _) in at_kill_1.items() if state == "running"}

    second = start_server(ENV)
    with second.client() as client:
        # Second kill: some finished, some running, some still waiting.
        wait_for_counts(client, job_ids, lambda c: c["succeeded"] >= CONCURRENCY and c["running"] >= 1 and c["queued"])
    assert second.kill9() == -signal.SIGKILL
    at_kill_2 = states_on_disk(second.job_store)
    states_2 = Counter(state for state, _ in at_kill_2.values())
    running_2 = {job_id for job_id, (state, _) in at_kill_2.items() if state == "running"}
    done_2 = {job_id for job_id, (state, _) in at_kill_2.items() if state == "succeeded"}
    assert running_2 and done_2 and states_2["queued"], states_2

    third = start_server(LAST_ENV)
    with third.client() as client:
        jobs = wait_until_terminal(client, job_ids, timeout_s=240)
    print(
        f"\nkill -9 #1: {dict(states_1)}; kill -9 #2: {dict(states_2)}; after the third start: "
        f"{dict(Counter(job['state'] for job in jobs.values()))}, "
        f"attempts {dict(Counter(job['attempts'] for job in jobs.values()))}"
    )

    assert {job_id: job["state"] for job_id, job in jobs.items()} == dict.fromkeys(job_ids, "succeeded")
    for job_id, job in jobs.items():
        expected = 1 + (job_id in running_1) + (job_id in running_2)
        assert job["attempts"] == expected, (job_id, job["attempts"], at_kill_1[job_id], at_kill_2[job_id])
        assert job["result"]["completion_tokens"] == TOKENS
        assert job["error"] is None

    logs = [first.log_text(), second.log_text(), third.log_text()]
    assert re.search(rf"Re-queued {len(running_1)} job\(s\) left running by a process that died", logs[1])
    assert re.search(rf"Re-queued {len(running_2)} job\(s\) left running by a process that died", logs[2])
    everything = "".join(logs)
    for job_id in job_ids:
        assert everything.count(f"Job {job_id} succeeded") == 1, job_id
        assert f"Job {job_id} result" not in everything, f"a second result of {job_id} was produced and discarded"
    for job_id in done_2:
        assert f"Job {job_id} started" not in logs[2], f"{job_id} had finished but ran again"


# ----- Stores that cannot be written ---------------------------------------------------------------


@dataclass(frozen=True)
class FailedStart:
    """How one ``uvicorn main:app`` on an unwritable store ended: exit code, output, seconds to exit."""

    code: int
    output: str
    seconds: float


def start_expecting_failure(
    job_store: Path, workdir: Path, *, max_file_bytes: int | None = None
) -> Callable[[], FailedStart]:
    """Start ``uvicorn main:app`` on this store; the returned call waits until it exits and says how."""
    started = time.monotonic()
    # Output goes to a pipe: RLIMIT_FSIZE applies to regular files only, so the log itself is not cut.
    read_end, write_end = os.pipe()
    try:
        args = ["main:app", "--host", "127.0.0.1", "--port", str(free_port())]
        env = server_env(job_store, {"TEXTGEN_TORCH_THREADS": "1"})
        proc = start_uvicorn(args, env, write_end, workers=1, workdir=workdir, max_file_bytes=max_file_bytes)
    except BaseException:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)  # the server holds its own copy: the pipe ends when the server does
    output: list[bytes] = []
    reader = threading.Thread(target=lambda: output.append(read_all(read_end)), name="failing-start-output")
    reader.start()

    def finish() -> FailedStart:
        try:
            proc.wait(timeout=FAIL_FAST_S * 2)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        reader.join()
        text = b"".join(output).decode(errors="replace")
        return FailedStart(int(proc.returncode), text, time.monotonic() - started)

    return finish


def read_all(fd: int) -> bytes:
    with open(fd, "rb") as pipe:
        return pipe.read()


@dataclass(frozen=True)
class UnwritableStore:
    job_store: Path
    reason: str  # what the CRITICAL line must name
    max_file_bytes: int | None = None


@dataclass(frozen=True)
class SeededStore:
    """The store that holds jobs before its "disk" fills: what was in it, read before the start."""

    job_ids: list[str]
    before: dict[str, tuple[str, int]]
    size: int


async def seed_jobs(job_store: Path) -> list[str]:
    store = SQLiteJobStore(job_store)
    await store.open()
    try:
        jobs = [await store.create({"prompt": f"kept {i}", "max_new_tokens": 4}, request_id=None) for i in range(3)]
    finally:
        await store.close()
    return [job.id for job in jobs]


@pytest.fixture(scope="module")
def unwritable_stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, UnwritableStore], SeededStore]:
    folder = tmp_path_factory.mktemp("unwritable")
    (folder / "not-a-dir").write_text("a regular file\n")
    existing = folder / "existing" / "jobs.db"
    existing.parent.mkdir()
    job_ids = asyncio.run(seed_jobs(existing))
    seeded = SeededStore(job_ids, states_on_disk(existing), existing.stat().st_size)
    cases = {
        "full disk, fresh store": UnwritableStore(folder / "full" / "jobs.db", "disk I/O error", FULL_DISK_BYTES),
        "full disk, existing store": UnwritableStore(existing, "disk I/O error", FULL_DISK_BYTES),
        # procfs: nobody, root included, can create files there
        "read-only filesystem": UnwritableStore(Path("/proc/textgen-jobs.db"), "unable to open database file"),
        "parent is a file": UnwritableStore(folder / "not-a-dir" / "jobs.db", "cannot create directory"),
    }
    return cases, seeded


@pytest.fixture(scope="module")
def failed_starts(
    unwritable_stores: tuple[dict[str, UnwritableStore], SeededStore], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, FailedStart]:
    """Every unwritable store's server, all started at once: each fails within its imports and a store open,
    so their starts overlap instead of queueing (the assertions are per case, in the tests below)."""
    cases, _ = unwritable_stores
    workdir = tmp_path_factory.mktemp("failing-starts")
    waits = {
        case: start_expecting_failure(store.job_store, workdir, max_file_bytes=store.max_file_bytes)
        for case, store in cases.items()
    }
    with ThreadPoolExecutor(max_workers=len(waits), thread_name_prefix="failing-start") as pool:
        ended = {case: pool.submit(wait) for case, wait in waits.items()}
    return {case: future.result() for case, future in ended.items()}


def assert_clear_startup_failure(code: int, output: str, seconds: float, job_store: Path, reason: str) -> None:
    critical = [line for line in output.splitlines() if " CRITICAL " in line]
    assert code != 0, output
    assert seconds < FAIL_FAST_S, f"took {seconds:.0f} s to fail"
    assert len(critical) == 1, output
    line = critical[0]
    assert "Cannot start: Cannot use job store at " + str(job_store) in line, line
    assert reason in line, line
    assert "TEXTGEN_JOB_STORE" in line, line
    assert "Application startup failed" in output, output
    assert "Traceback" not in output, output
    assert "Loading model" not in output, "the store must be checked before the model is loaded"
    assert "Uvicorn running" not in output and "Application startup complete" not in output, output


@pytest.mark.timeout(300)
def test_full_disk_fresh_store_fails_at_startup(
    unwritable_stores: tuple[dict[str, UnwritableStore], SeededStore], failed_starts: dict[str, FailedStart]
) -> None:
    case = "full disk, fresh store"
    store, ended = unwritable_stores[0][case], failed_starts[case]
    print(f"\n{case}: exit {ended.code} after {ended.seconds:.1f} s: {ended.output.strip().splitlines()[-2:]}")
    assert_clear_startup_failure(ended.code, ended.output, ended.seconds, store.job_store, store.reason)


@pytest.mark.timeout(300)
def test_full_disk_existing_store_fails_at_startup_and_keeps_its_jobs(
    unwritable_stores: tuple[dict[str, UnwritableStore], SeededStore], failed_starts: dict[str, FailedStart]
) -> None:
    case = "full disk, existing store"
    (cases, seeded), ended = unwritable_stores, failed_starts[case]
    store = cases[case]
    assert seeded.size > FULL_DISK_BYTES  # the store is bigger than what the "disk" lets the process write
    print(f"\n{case}: exit {ended.code} after {ended.seconds:.1f} s")
    assert_clear_startup_failure(ended.code, ended.output, ended.seconds, store.job_store, store.reason)
    assert states_on_disk(store.job_store) == seeded.before == dict.fromkeys(seeded.job_ids, ("queued", 0)), (
        "jobs were lost"
    )


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("case", "reason"),
    [("read-only filesystem", "unable to open database file"), ("parent is a file", "cannot create directory")],
)
def test_unwritable_store_path_fails_at_startup(
    unwritable_stores: tuple[dict[str, UnwritableStore], SeededStore],
    failed_starts: dict[str, FailedStart],
    case: str,
    reason: str,
) -> None:
    store, ended = unwritable_stores[0][case], failed_starts[case]
    assert store.reason == reason
    print(f"\n{case}: exit {ended.code} after {ended.seconds:.1f} s")
    assert_clear_startup_failure(ended.code, ended.output, ended.seconds, store.job_store, reason)
