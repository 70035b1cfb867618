"""The app on Ray Serve: two replicas behind Serve's proxy sharing one Redis job store; a replica killed
with SIGKILL while it runs jobs (its jobs are reclaimed once their leases expire and run again), and
one stopped by Ray on scale-down (its lifespan shutdown hands its jobs back at once).

Replicas are told apart by ``X-TextGen-Replica`` (added by deploy/ray_serve.py): the answering
replica's job-runner owner id ``host:pid:token``, the same id the store records as a running job's
``owner``. The pid in it is checked to be a Ray Serve replica process before anything is killed.
The store is read directly for what the API does not show (owners, attempts).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import yaml

from tests.ray.conftest import APP_NAME, SERVE_CONFIG, Deployer, TextGenOnRay, open_store
from tests.support.waiting import wait_until
from textgen.errors import JobNotCancellableError
from textgen.jobs.store import TERMINAL_STATES, Job, JobState, JobStore

pytestmark = [pytest.mark.ray, pytest.mark.server]

logger = logging.getLogger(__name__)

REPLICA_HEADER = "x-textgen-replica"
SHORT = {"prompt": "The future of AI is", "max_new_tokens": 2, "temperature": 0}
# About 1000 decode steps: a few seconds for a batch of jobs on the tiny model with one torch thread,
# long enough to be killed mid-run (the tiny model has 1024 positions).
LONG_TOKENS = 1000
LONG = {"prompt": "Once upon a time", "max_new_tokens": LONG_TOKENS, "ignore_eos": True, "temperature": 0}
WAVE = 4
MAX_WAVES = 10
MAX_READS = 50
POLL_S = 0.05
JOBS_TIMEOUT_S = 60.0


def client(app: TextGenOnRay) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=app.url, timeout=60.0)


def owner_pid(owner: str) -> int:
    return int(owner.split(":")[1])


def is_serve_replica(pid: int) -> bool:
    """Whether ``pid`` is a live Ray Serve replica (Ray titles them ``ray::ServeReplica:<app>:<deployment>``)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    return cmdline.startswith("ray::ServeReplica")


async def job_of(store: JobStore, job_ids: Iterable[str]) -> dict[str, Job]:
    return {job_id: await store.get(job_id) for job_id in job_ids}


@pytest.mark.timeout(30)
def test_serve_config_is_valid_for_this_deployment() -> None:
    from ray.serve.schema import ServeDeploySchema

    from deploy.ray_serve import HANDBACK_MARGIN_S, app

    config = ServeDeploySchema.model_validate(yaml.safe_load(SERVE_CONFIG.read_text()))
    (application,) = config.applications
    assert application.import_path == "deploy.ray_serve:app" and app is not None
    (deployment,) = application.deployments
    grace_s = float(application.runtime_env["env_vars"]["TEXTGEN_SHUTDOWN_GRACE_S"])
    assert deployment.graceful_shutdown_timeout_s >= grace_s + HANDBACK_MARGIN_S
    assert deployment.max_ongoing_requests > 64, "a replica must be able to fill a batch of TEXTGEN_MAX_RUNNING"


def fake_replica(state: object | None) -> SimpleNamespace:
    """Just what check_health reads: ``self.app.state.textgen``."""
    app_state = SimpleNamespace() if state is None else SimpleNamespace(textgen=state)
    return SimpleNamespace(app=SimpleNamespace(state=app_state))


def service_state(*, ready: bool, shutting_down: bool) -> SimpleNamespace:
    return SimpleNamespace(engine=SimpleNamespace(ready=ready, name="batched"), shutting_down=shutting_down)


@pytest.mark.timeout(30)
async def test_check_health_fails_only_when_the_engine_stopped_on_its_own() -> None:
    from deploy.ray_serve import TextGenDeployment

    check_health = TextGenDeployment.func_or_class.check_health
    await check_health(fake_replica(service_state(ready=True, shutting_down=False)))
    await check_health(fake_replica(service_state(ready=False, shutting_down=True)))  # draining on purpose
    with pytest.raises(RuntimeError, match="engine is not running"):
        await check_health(fake_replica(service_state(ready=False, shutting_down=False)))
    with pytest.raises(RuntimeError, match="did not build"):
        await check_health(fake_replica(None))


@pytest.mark.timeout(150)  # includes starting Ray and both replicas
async def test_check_health_passes_on_serving_replicas(textgen: TextGenOnRay) -> None:
    from ray import serve

    handle = serve.get_app_handle(APP_NAME)
    assert await asyncio.gather(*(handle.check_health.remote() for _ in range(4))) == [None] * 4


@pytest.mark.timeout(60)
async def test_generate_is_served_by_both_replicas(textgen: TextGenOnRay) -> None:
    seen: Counter[str] = Counter()
    async with client(textgen) as http:
        for _ in range(MAX_WAVES):
            responses = await asyncio.gather(*(http.post("/generate", json=SHORT) for _ in range(WAVE)))
            for response in responses:
                assert response.status_code == 200, response.text
                assert response.json()["completion_tokens"] == SHORT["max_new_tokens"]
                # One X-Request-ID, not the app's and the proxy's copies of it.
                assert len(response.headers.get_list("x-request-id")) == 1
                seen[response.headers[REPLICA_HEADER]] += 1
            if len(seen) == 2:
                break
    logger.info("POST /generate answered by replicas: %s", dict(seen))
    assert len(seen) == 2, f"only one replica answered {seen.total()} requests: {seen}"
    assert all(is_serve_replica(owner_pid(owner)) for owner in seen), seen


@pytest.mark.timeout(60)
async def test_job_submitted_through_one_replica_is_read_through_the_other(textgen: TextGenOnRay) -> None:
    async with client(textgen) as http:
        submitted = await http.post("/generate_background", json=SHORT)
        assert submitted.status_code == 202, submitted.text
        job_id, accepted_by = submitted.json()["job_id"], submitted.headers[REPLICA_HEADER]
        readers: Counter[str] = Counter()
        reads: list[httpx.Response] = []

        async def read_elsewhere_and_done() -> bool:
            read = await http.get(f"/jobs/{job_id}")
            reads.append(read)
            if read.status_code != 200:
                return True  # stop: the asserts below report it
            readers[read.headers[REPLICA_HEADER]] += 1
            return bool(readers.keys() - {accepted_by}) and read.json()["state"] == "succeeded"

        with contextlib.suppress(AssertionError):  # a timeout: the asserts below say what was missing
            await wait_until(read_elsewhere_and_done, MAX_READS * POLL_S * 4, "a read through the other replica")
        for read in reads:
            assert read.status_code == 200, read.text
            assert read.json()["job_id"] == job_id
    logger.info("job %s accepted by %s, read by %s", job_id, accepted_by, dict(readers))
    assert readers.keys() - {accepted_by}, f"every read went to the replica that accepted the job: {readers}"
    assert read.json()["state"] == "succeeded", read.text
    async with open_store(textgen.job_store) as store:
        job = await store.get(job_id)
    assert job.state is JobState.SUCCEEDED and job.result == read.json()["result"]


async def submit_long_jobs(http: httpx.AsyncClient, count: int) -> list[str]:
    responses = await asyncio.gather(*(http.post("/generate_background", json=LONG) for _ in range(count)))
    assert all(response.status_code == 202 for response in responses), [r.text for r in responses]
    return [response.json()["job_id"] for response in responses]


def running_by_owner(jobs: dict[str, Job]) -> dict[str, set[str]]:
    owners: dict[str, set[str]] = {}
    for job_id, job in jobs.items():
        if job.state is JobState.RUNNING and job.owner is not None:
            owners.setdefault(job.owner, set()).add(job_id)
    return owners


async def wait_running(
    store: JobStore, job_ids: list[str], owners: int, timeout_s: float = 30.0
) -> dict[str, set[str]]:
    """Owner -> running job ids, once ``owners`` replicas each run at least two of the jobs."""
    busy: dict[str, set[str]] = {}

    async def enough_busy() -> bool:
        running = running_by_owner(await job_of(store, job_ids))
        busy.clear()
        busy.update({owner: ids for owner, ids in running.items() if len(ids) >= 2})
        return len(busy) >= owners

    try:
        await wait_until(enough_busy, timeout_s, "replicas running two jobs each", interval_s=POLL_S)
    except AssertionError:
        pytest.fail(f"not {owners} replica(s) running two of the jobs within {timeout_s:.0f} s")
    return busy


def running_on(jobs: dict[str, Job], owner: str) -> set[str]:
    return {job_id for job_id, job in jobs.items() if job.state is JobState.RUNNING and job.owner == owner}


async def wait_reclaimed(store: JobStore, job_ids: set[str], owner: str, timeout_s: float) -> None:
    """Until none of ``job_ids`` is running under ``owner`` any more (requeued, or taken by another)."""

    async def none_left() -> bool:
        return not running_on(await job_of(store, job_ids), owner)

    await wait_until(none_left, timeout_s, f"the jobs running under {owner} leaving it", interval_s=POLL_S)


async def wait_terminal(store: JobStore, job_ids: list[str], timeout_s: float) -> dict[str, Job]:
    jobs: dict[str, Job] = {}

    async def all_ended() -> bool:
        jobs.update(await job_of(store, job_ids))
        return all(job.state in TERMINAL_STATES for job in jobs.values())

    try:
        await wait_until(all_ended, timeout_s, "every job ending", interval_s=POLL_S * 4)
    except AssertionError:
        states = Counter(job.state.value for job in jobs.values())
        raise AssertionError(f"jobs not finished within {timeout_s:.0f} s: {states}") from None
    return jobs


def kill_replica(owner: str) -> float:
    """SIGKILL the replica process named by a job owner id; returns when (monotonic) it was sent."""
    pid = owner_pid(owner)
    assert is_serve_replica(pid), f"{owner} is not a Ray Serve replica process"
    killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    return killed_at


@pytest.mark.timeout(120)
async def test_killed_replica_loses_no_job(textgen: TextGenOnRay, record_property: Any) -> None:
    async with client(textgen) as http, open_store(textgen.job_store) as store:
        job_ids = await submit_long_jobs(http, 2 * textgen.job_concurrency)
        victim = next(iter(await wait_running(store, job_ids, owners=1)))
        killed_at = kill_replica(victim)
        # A dead process writes nothing more: once it is gone, what still runs under its id is what it lost.
        await wait_until(lambda: not is_serve_replica(owner_pid(victim)), 10, "the killed replica gone")
        lost = running_on(await job_of(store, job_ids), victim)
        assert lost, "the victim finished its jobs before it was killed; make the jobs longer"
        await wait_reclaimed(store, lost, victim, timeout_s=textgen.lease_s * 10)
        reclaim_s = time.monotonic() - killed_at
        # The other jobs never lost their replica: cancelled, so the slots they hold go to the lost ones at once
        # (a whole run of 1000 steps sooner); the lost ones must all still finish.
        cancelled = await cancel_unfinished(store, set(job_ids) - lost)
        jobs = await wait_terminal(store, job_ids, JOBS_TIMEOUT_S)
    logger.info(
        "SIGKILL of replica %s: %d running job(s) reclaimed %.2f s later (TEXTGEN_JOB_LEASE_S=%s)",
        victim,
        len(lost),
        reclaim_s,
        textgen.lease_s,
    )
    record_property("reclaim_s", round(reclaim_s, 2))
    # Results are written only by the replica holding the job (the store's finish is conditional on the
    # owner), so each job has one result, and it is a whole run, not the dead replica's partial one.
    for job_id, job in jobs.items():
        if job_id in cancelled and job.state is JobState.CANCELLED:
            continue
        assert job.state is JobState.SUCCEEDED, (job_id, job.state, job.error)
        assert job.result is not None and job.result["completion_tokens"] == LONG_TOKENS, job_id
    assert all(jobs[job_id].state is JobState.SUCCEEDED for job_id in lost)
    assert all(jobs[job_id].attempts >= 2 for job_id in lost), {job_id: jobs[job_id].attempts for job_id in lost}


async def wait_one_gone(owners: Iterable[str], timeout_s: float = 30.0) -> str:
    """The first of ``owners`` whose replica process has exited."""
    gone: list[str] = []

    def one_gone() -> bool:
        gone[:] = [owner for owner in owners if not is_serve_replica(owner_pid(owner))]
        return bool(gone)

    try:
        await wait_until(one_gone, timeout_s, "a replica stopping", interval_s=POLL_S)
    except AssertionError:
        pytest.fail(f"no replica stopped within {timeout_s:.0f} s of scaling down")
    return gone[0]


# With leases longer than the test waits, only the stopping replica's own hand-back (its lifespan shutdown, run
# by Ray's graceful stop) can put its jobs back in the queue in time.
HANDBACK_LEASE_S = 60.0
# One sequence at a time per replica: each holds 8 claimed jobs of 1000 steps that it works through one by one,
# so some are still running when Ray stops it, however fast the model core is (the survivor's own jobs are then
# cancelled, so it runs only the handed-back ones, one by one). TEXTGEN_RATE_LIMIT_RPM is the rpm test's: it
# runs on the one replica this test leaves, with no restart (a replica start is ~10 s); so this test puts its
# jobs in the store directly, as POST /generate_background would, instead of through the limited API.
HANDBACK_SETTINGS = {
    "TEXTGEN_JOB_LEASE_S": str(HANDBACK_LEASE_S),
    "TEXTGEN_JOB_CONCURRENCY": "8",
    "TEXTGEN_MAX_RUNNING": "1",
    "TEXTGEN_RATE_LIMIT_RPM": "2",
}


async def put_long_jobs(store: JobStore, count: int) -> list[str]:
    """``count`` LONG jobs queued straight in the store (the request body the API stores for LONG)."""
    return [(await store.create(dict(LONG), request_id=None)).id for _ in range(count)]


@pytest.mark.timeout(120)
async def test_replica_stopped_by_ray_hands_its_jobs_back(deployer: Deployer) -> None:
    lease_s = HANDBACK_LEASE_S
    app = await asyncio.to_thread(deployer.deploy, **HANDBACK_SETTINGS)
    async with open_store(app.job_store) as store:
        job_ids = await put_long_jobs(store, 2 * app.job_concurrency)
        running = await wait_running(store, job_ids, owners=2)
        asked_at = time.monotonic()
        await asyncio.to_thread(deployer.deploy, 1, **HANDBACK_SETTINGS)  # only the replica count changes
        stopped = await wait_one_gone(running)
        await wait_reclaimed(store, running[stopped], stopped, timeout_s=lease_s / 3)
        handback_s = time.monotonic() - asked_at
        # The survivor's own jobs are not what this test is about (the other tests run jobs to the end): it
        # holds them one after another with TEXTGEN_MAX_RUNNING=1, so they are cancelled here (it notices
        # within a poll) and its slots go to the handed-back jobs, which must all still finish.
        cancelled = await cancel_unfinished(store, set(job_ids) - running[stopped])
        jobs = await wait_terminal(store, job_ids, JOBS_TIMEOUT_S)
    handed_back = {job_id for job_id in running[stopped] if jobs[job_id].attempts >= 2}
    logger.info(
        "scale-down stopped %s: %d of its %d running job(s) handed back within %.2f s (lease %.0f s)",
        stopped,
        len(handed_back),
        len(running[stopped]),
        handback_s,
        lease_s,
    )
    assert handed_back, "the stopped replica finished all its jobs before it stopped; make the jobs longer"
    assert handback_s < lease_s / 3, "requeued so late that a lease may have expired"
    for job_id, job in jobs.items():
        if job_id in cancelled and job.state is JobState.CANCELLED:
            continue
        assert job.state is JobState.SUCCEEDED, (job_id, job.state, job.error)
        assert job.result is not None and job.result["completion_tokens"] == LONG_TOKENS, job_id
    assert all(jobs[job_id].state is JobState.SUCCEEDED for job_id in running[stopped])


async def cancel_unfinished(store: JobStore, job_ids: set[str]) -> set[str]:
    """Cancel those of ``job_ids`` that have not ended yet (in the store, as another process would)."""
    cancelled: set[str] = set()
    for job_id, job in (await job_of(store, job_ids)).items():
        if job.state not in TERMINAL_STATES:
            with contextlib.suppress(JobNotCancellableError):  # it ended in between
                await store.cancel(job_id)
                cancelled.add(job_id)
    return cancelled


@pytest.mark.timeout(120)
async def test_rpm_cannot_be_dodged_with_x_forwarded_for_through_rays_proxy(deployer: Deployer) -> None:
    # The one replica the hand-back test leaves, already limited (no restart when run after it); the proxy's
    # behaviour is the same for any replica count.
    app = await asyncio.to_thread(deployer.deploy, 1, **HANDBACK_SETTINGS)
    async with client(app) as http:
        statuses = [
            (
                await http.post(
                    "/generate",
                    json={"prompt": "The future of AI is", "max_new_tokens": 1},
                    headers={"X-Forwarded-For": f"203.0.113.{i}"},
                )
            ).status_code
            for i in range(3)
        ]
    assert statuses == [200, 200, 429]  # one client (the proxy's peer), whatever the header says
