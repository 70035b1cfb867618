"""Background jobs survive ``kill -9`` of the server: a restart on the same store finishes each exactly once."""

from __future__ import annotations

import re
import signal
from collections import Counter
from collections.abc import Callable

import pytest

from tests.support.server import Server, states_on_disk, submit_job, wait_until_terminal
from tests.support.waiting import wait_until_sync

pytestmark = [pytest.mark.e2e, pytest.mark.server]

JOBS = 10
TOKENS = 48
ENV = {"TEXTGEN_JOB_CONCURRENCY": "2"}
# The restart runs every job left at once (one batch, not five rounds of two): what it runs is the point, not how.
RESTART_ENV = {"TEXTGEN_JOB_CONCURRENCY": str(JOBS)}


@pytest.mark.timeout(600)  # two server starts plus ~10 generations; bounded inside
def test_jobs_survive_kill_9_and_finish_exactly_once(start_server: Callable[..., Server]) -> None:
    first = start_server(ENV)
    with first.client() as client:
        job_ids = [
            submit_job(
                client,
                {"prompt": f"Story number {i}: once upon a time", "max_new_tokens": TOKENS, "ignore_eos": True},
            )["job_id"]
            for i in range(JOBS)
        ]
        # Kill while some jobs are done, some are half-way through and the rest still wait.
        counts: Counter[str] = Counter()

        def one_done_one_running() -> bool:
            listed = client.get("/jobs", params={"limit": 100}).json()["jobs"]
            counts.clear()
            counts.update(job["state"] for job in listed if job["job_id"] in job_ids)
            return counts["running"] >= 1 and counts["succeeded"] >= 1

        try:
            wait_until_sync(one_done_one_running, 120, "a job running after a finished one")
        except AssertionError:
            pytest.fail(f"no job running after a finished one within 120 s: {counts}")

    assert first.kill9() == -signal.SIGKILL

    at_kill = states_on_disk(first.job_store)
    assert set(at_kill) == set(job_ids)
    running_at_kill = {job_id for job_id, (state, _) in at_kill.items() if state == "running"}
    done_at_kill = {job_id for job_id, (state, _) in at_kill.items() if state == "succeeded"}
    assert running_at_kill, f"no job was running when the server was killed: {at_kill}"
    assert len(running_at_kill) <= 2, "TEXTGEN_JOB_CONCURRENCY=2 allows two running jobs"

    second = start_server(RESTART_ENV)  # same tmp_path, so the same job store file
    assert second.job_store == first.job_store
    with second.client() as client:
        jobs = wait_until_terminal(client, job_ids, timeout_s=150)

        assert {job_id: job["state"] for job_id, job in jobs.items()} == dict.fromkeys(job_ids, "succeeded")
        for job_id, job in jobs.items():
            expected_attempts = 2 if job_id in running_at_kill else 1
            assert job["attempts"] == expected_attempts, (job_id, job["attempts"], at_kill[job_id])
            assert job["error"] is None
            assert job["started_at"] is not None and job["finished_at"] is not None
            result = job["result"]
            assert result is not None and result["generated_text"].strip()
            assert result["completion_tokens"] == TOKENS
            assert result["request_id"] == job["request_id"]
        for state in ("running", "queued"):
            left = client.get("/jobs", params={"state": state, "limit": 100})
            assert left.status_code == 200
            assert left.json()["jobs"] == [], f"jobs still {state}"

    new_log = second.log_text()
    assert re.search(rf"Re-queued {len(running_at_kill)} job\(s\) left running by a process that died", new_log), (
        second.log_tail()
    )
    # Exactly once: one "succeeded" line per job over both lives of the server, none discarded.
    logs = first.log_text() + new_log
    for job_id in job_ids:
        assert logs.count(f"Job {job_id} succeeded") == 1, job_id
        assert f"Job {job_id} result" not in logs, f"a second result of {job_id} was produced and discarded"
    for job_id in done_at_kill:
        assert f"Job {job_id} started" not in new_log, f"{job_id} had finished but ran again"
    for job_id in running_at_kill:
        assert f"Job {job_id} started (attempt 2)" in new_log

    # Graceful SIGTERM shutdown: uvicorn re-raises the signal after shutting down, so -15 (or 0), never -9.
    assert second.terminate() in (0, -signal.SIGTERM)
    assert "Shutdown complete" in second.log_text(), second.log_tail()
