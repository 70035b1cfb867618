"""Two uvicorn workers share one SQLite job store: any worker reads any job; each job runs once."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.support.server import MODEL_NAME, Server, launch_server, submit_job, wait_until_terminal

pytestmark = [pytest.mark.e2e, pytest.mark.server]

WORKERS = 2
READS_PER_JOB = 20


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # One torch thread per worker: two workers on a small machine should not fight over cores.
    env = {"TEXTGEN_TORCH_THREADS": "1"}
    with launch_server(env, workers=WORKERS, workdir=tmp_path_factory.mktemp("two-workers")) as server:
        yield server


def test_both_workers_started(two_workers: Server) -> None:
    log = two_workers.log_text()
    assert log.count("Service ready") == WORKERS, two_workers.log_tail()


def test_jobs_readable_through_every_worker_and_run_once(two_workers: Server) -> None:
    with two_workers.client() as client:
        job_ids = [
            submit_job(client, {"prompt": f"Fact {i}:", "max_new_tokens": 16, "ignore_eos": True})["job_id"]
            for i in range(6)
        ]
        # Each read lands on whichever worker accepts the connection: a fresh connection per read
        # (no keep-alive pinning one worker), and every read must find the job.
        for job_id in job_ids:
            for _ in range(READS_PER_JOB):
                response = httpx.get(f"{two_workers.url}/jobs/{job_id}", timeout=30)
                assert response.status_code == 200, response.text
                assert response.json()["job_id"] == job_id

        jobs = wait_until_terminal(client, job_ids, timeout_s=150)

    for job in jobs.values():
        assert job["state"] == "succeeded", job
        assert job["attempts"] == 1, job
        assert job["result"]["completion_tokens"] == 16
    log = two_workers.log_text()
    for job_id in job_ids:
        assert log.count(f"Job {job_id} started") == 1, f"{job_id} was started more than once"
        assert log.count(f"Job {job_id} succeeded") == 1


def test_generate_with_two_workers(two_workers: Server) -> None:
    body = {"prompt": "The capital of France is", "max_new_tokens": 8, "temperature": 0}

    def generate(_: int) -> httpx.Response:
        return httpx.post(f"{two_workers.url}/generate", json=body, timeout=120)

    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(generate, range(4)))

    for response in responses:
        assert response.status_code == 200, response.text
        assert response.json()["model"] == MODEL_NAME
        assert response.json()["completion_tokens"] > 0
        assert "paris" in response.json()["generated_text"].lower(), response.json()
