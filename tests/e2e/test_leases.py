"""Leases across processes: two service processes share one job store (SQLite file or Redis); one is
killed with SIGKILL while it runs jobs, and the other reclaims them once their leases expire and
finishes them, without the dead one ever restarting. Each job ends ``succeeded`` exactly once.

The time from the kill to the victim's jobs being reclaimed is logged (and bounded by the lease plus
one poll plus slack); it is the number the README quotes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.support.redis import RedisServer
from tests.support.server import Server, get_job, submit_job, wait_until_terminal
from tests.support.waiting import wait_until_sync
from textgen.backends import job_store_from_url
from textgen.jobs.store import Job

pytestmark = [pytest.mark.e2e, pytest.mark.server]
logger = logging.getLogger(__name__)

LEASE_S = 3.0
POLL_S = 0.2
JOBS = 4
# Long enough that each job is still running when its process dies, short enough for CI.
JOB_BODY = {"prompt": "Write a long story about a lighthouse keeper.", "max_new_tokens": 64, "ignore_eos": True}


def read_jobs(store_url: str, job_ids: list[str]) -> dict[str, Job]:
    """The jobs as stored (owner included), read with the service's own store class."""

    async def read() -> dict[str, Job]:
        store = job_store_from_url(store_url)
        await store.open()
        try:
            return {job_id: await store.get(job_id) for job_id in job_ids}
        finally:
            await store.close()

    return asyncio.run(read())


def owner_pid(job: Job) -> int | None:
    return int(job.owner.split(":")[1]) if job.owner else None


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> float:
    try:
        return wait_until_sync(condition, timeout_s, what)
    except AssertionError:
        pytest.fail(f"{what} did not happen within {timeout_s:.0f} s")


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'shared-jobs.db'}"
    server: RedisServer = request.getfixturevalue("redis_server")
    return server.url(db=3)


@pytest.mark.timeout(360)
def test_a_killed_process_jobs_are_finished_by_the_survivor(
    start_servers: Callable[..., list[Server]], store_url: str
) -> None:
    env = {
        "TEXTGEN_JOB_STORE": store_url,
        "TEXTGEN_JOB_LEASE_S": str(LEASE_S),
        "TEXTGEN_JOB_POLL_INTERVAL_S": str(POLL_S),
        "TEXTGEN_JOB_CONCURRENCY": "2",
    }
    servers = start_servers(env, 2)
    by_pid = {server.pid: server for server in servers}

    with servers[0].client() as client:
        job_ids = [submit_job(client, JOB_BODY)["job_id"] for _ in range(JOBS)]

    def victim_jobs() -> dict[str, Job]:
        jobs = read_jobs(store_url, job_ids)
        return {i: j for i, j in jobs.items() if j.state == "running" and owner_pid(j) in by_pid}

    wait_for(lambda: len(victim_jobs()) >= 1, 120, "a job running")
    running = victim_jobs()
    victim_pid = owner_pid(next(iter(running.values())))
    assert victim_pid is not None
    victim, survivor = by_pid[victim_pid], next(s for s in servers if s.pid != victim_pid)

    os.kill(victim.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    victim.proc.wait(timeout=30)
    orphans = [job_id for job_id, job in victim_jobs().items() if owner_pid(job) == victim_pid]
    assert orphans, "the victim finished its jobs before it died; make JOB_BODY longer"

    def reclaimed() -> bool:
        jobs = read_jobs(store_url, orphans)
        return all(job.owner is None or owner_pid(job) == survivor.pid for job in jobs.values())

    wait_for(reclaimed, LEASE_S + 30, "the survivor reclaiming the dead process's jobs")
    reclaim_s = time.monotonic() - killed_at
    logger.warning("store=%s: jobs of the killed process reclaimed %.2f s after the kill", store_url[:6], reclaim_s)
    assert reclaim_s >= LEASE_S * 0.5, "reclaimed before the lease could have expired"

    with survivor.client() as client:
        finished = wait_until_terminal(client, job_ids, timeout_s=240)
        assert {job["state"] for job in finished.values()} == {"succeeded"}, finished
        for job_id in orphans:
            assert finished[job_id]["attempts"] == 2
            assert finished[job_id]["result"]["completion_tokens"] == JOB_BODY["max_new_tokens"]
        stored = read_jobs(store_url, job_ids)
        assert all(owner_pid(stored[job_id]) == survivor.pid for job_id in orphans)
        # The dead process is gone for good and the survivor still serves everything.
        assert get_job(client, orphans[0])["state"] == "succeeded"
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{victim.url}/health", timeout=2)
