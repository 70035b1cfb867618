"""A background job's life on a real server: queued -> running -> succeeded, then its result."""

from __future__ import annotations

import httpx
import pytest

from tests.support.server import MODEL_NAME, get_job, submit_job, wait_until_terminal
from tests.support.waiting import wait_until_sync

pytestmark = [pytest.mark.e2e, pytest.mark.server]

ORDER = ["queued", "running", "succeeded"]


def is_ordered_subsequence(seen: list[str], order: list[str]) -> bool:
    positions = [order.index(state) for state in seen if state in order]
    return len(positions) == len(seen) and positions == sorted(set(positions))


def wait_for_state(client: httpx.Client, job_id: str, state: str, timeout_s: float) -> dict:
    job: dict = {}

    def reached() -> bool:
        job.update(get_job(client, job_id))
        return bool(job["state"] == state)

    try:
        wait_until_sync(reached, timeout_s, f"job {job_id} {state}", interval_s=0.02)
    except AssertionError:
        pytest.fail(f"job {job_id} never reached {state!r}; last: {job}")
    return job


def test_background_job_goes_queued_running_succeeded(client: httpx.Client) -> None:
    # The default server runs one job at a time: occupy it so the job under test has to wait.
    blocker = submit_job(client, {"prompt": "Write a long story.", "max_new_tokens": 24, "ignore_eos": True})
    wait_for_state(client, blocker["job_id"], "running", timeout_s=30)

    response = client.post(
        "/generate_background",
        json={"prompt": "The capital of France is", "max_new_tokens": 40, "ignore_eos": True, "temperature": 0},
        headers={"X-Request-ID": "e2e-background-1"},
    )
    assert response.status_code == 202, response.text
    accepted = response.json()
    job_id = accepted["job_id"]
    assert accepted["state"] == "queued"
    assert accepted["request_id"] == "e2e-background-1" == response.headers["X-Request-ID"]
    assert accepted["status_url"] == f"/jobs/{job_id}" == response.headers["Location"]

    seen: list[str] = []
    job: dict = {}

    def ended() -> bool:
        job.update(get_job(client, job_id))
        if not seen or seen[-1] != job["state"]:
            seen.append(job["state"])
        return job["state"] in ("succeeded", "failed", "cancelled")

    try:
        wait_until_sync(ended, 120, "the job ending", interval_s=0.02)
    except AssertionError:
        pytest.fail(f"job still {job['state']} after 120 s (seen {seen})")

    assert job["state"] == "succeeded", job
    assert is_ordered_subsequence(seen, ORDER), seen
    assert seen == ORDER, f"expected to observe every state, saw {seen}"
    assert job["error"] is None
    assert job["attempts"] == 1
    assert job["started_at"] is not None and job["finished_at"] is not None
    assert job["created_at"] <= job["started_at"] <= job["finished_at"]
    assert job["request"]["prompt"] == "The capital of France is"
    result = job["result"]
    assert result["generated_text"].strip()
    assert result["model"] == MODEL_NAME
    assert result["completion_tokens"] == 40
    assert result["request_id"] == "e2e-background-1"

    blocker_job = wait_until_terminal(client, [blocker["job_id"]], timeout_s=60)[blocker["job_id"]]
    assert blocker_job["state"] == "succeeded"
    assert blocker_job["finished_at"] <= job["started_at"], "with TEXTGEN_JOB_CONCURRENCY=1 the jobs ran one by one"

    listed = client.get("/jobs", params={"state": "succeeded", "limit": 100})
    assert listed.status_code == 200
    assert {job_id, blocker["job_id"]} <= {j["job_id"] for j in listed.json()["jobs"]}


def test_unknown_job_is_404(client: httpx.Client) -> None:
    response = client.get("/jobs/does-not-exist")
    assert response.status_code == 404
    assert response.json()["request_id"] == response.headers["X-Request-ID"]
