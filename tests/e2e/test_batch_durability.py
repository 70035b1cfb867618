"""Batches survive kill -9: real ``uvicorn`` processes on the tiny GPT-2, the official ``openai`` client.

- SQLite: the only process is killed mid-batch and started again on the same files; the batch completes.
- Redis: two processes share the store and a files folder; the one the client talked to is killed
  mid-batch, and the survivor reclaims its lines (and the batch) and completes it.

Either way every line is answered exactly once: one job per line in the job store, each succeeded, and
each ``custom_id`` once in the output file (checked by the integration suite's reference parser).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from openai import OpenAI
from openai.types import Batch

from tests.support.batch_files import completion_line, jsonl, parse_batch_output
from tests.support.redis import RedisServer
from tests.support.server import Server
from tests.support.waiting import wait_until_sync
from textgen.backends import job_store_from_url
from textgen.jobs.store import Job, JobState

pytestmark = [pytest.mark.e2e, pytest.mark.server]

LINES = 40
BODY = {"max_tokens": 48, "ignore_eos": True}
ENDED = {"completed", "failed", "cancelled", "expired"}


def tiny_env(tiny_model_dir: Path, **extra: str) -> dict[str, str]:
    return {
        "TEXTGEN_MODEL": str(tiny_model_dir),
        "TEXTGEN_DTYPE": "float32",
        "TEXTGEN_JOB_CONCURRENCY": "2",
        "TEXTGEN_JOB_LEASE_S": "2",
        "TEXTGEN_JOB_POLL_INTERVAL_S": "0.1",
        "TEXTGEN_BATCH_POLL_INTERVAL_S": "0.1",
        **extra,
    }


def client_of(server: Server) -> OpenAI:
    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def create_batch(oai: OpenAI) -> tuple[Batch, list[str]]:
    custom_ids = [f"line-{i}" for i in range(LINES)]
    uploaded = oai.files.create(
        file=("in.jsonl", jsonl([completion_line(c, **BODY) for c in custom_ids])), purpose="batch"
    )
    batch = oai.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h")
    return batch, custom_ids


def wait_for(oai: OpenAI, batch_id: str, done: Callable[[Batch], bool], timeout_s: float) -> Batch:
    last: list[Batch] = []

    def there() -> bool:
        last[:] = [oai.batches.retrieve(batch_id)]
        return done(last[0])

    try:
        wait_until_sync(there, timeout_s, "the batch")
    except AssertionError:
        pytest.fail(f"batch not there within {timeout_s:.0f} s: {last[0].status} {last[0].request_counts}")
    return last[0]


def mid_batch(batch: Batch) -> bool:
    assert batch.status not in ENDED, "the batch ended before the kill; make it longer"
    return batch.request_counts is not None and batch.request_counts.completed >= 5


def wait_until_a_line_runs(oai: OpenAI, store_url: str, batch_id: str, pid: int) -> None:
    """Mid-batch, and a line's job is running right now in process ``pid`` (as the store says): the kill must
    catch one in flight there (with two processes on one store, a line running in the other proves nothing),
    and a fast engine spends much of a batch between lines (the runner polls for work)."""

    def running_here() -> bool:
        wait_for(oai, batch_id, mid_batch, 120)
        jobs = line_jobs(store_url, batch_id)
        return any(job.state is JobState.RUNNING and owner_pid(job) == pid for job in jobs)

    try:
        wait_until_sync(running_here, 120, "a line running mid-batch", interval_s=0.0)
    except AssertionError:
        pytest.fail(f"no line was seen running mid-batch in process {pid}")


KILL_ROUNDS = 5


def kill_9_with_a_line_in_flight(
    oai: OpenAI, store_url: str, batch_id: str, victim: Server, restart: Callable[[], Server]
) -> None:
    """kill -9 ``victim`` while a line of the batch runs in it, as the store says after the kill.

    A line seen running can finish in the instant before the signal lands (the tiny model answers a line in
    milliseconds), and then the kill proves nothing: such a round restarts a process (``restart``) and
    kills it again, up to KILL_ROUNDS times, so the test never depends on winning that race."""
    for _ in range(KILL_ROUNDS):
        wait_until_a_line_runs(oai, store_url, batch_id, victim.pid)
        victim.kill9()
        jobs = line_jobs(store_url, batch_id)
        if any(job.state is JobState.RUNNING and owner_pid(job) == victim.pid for job in jobs):
            return
        victim = restart()
        oai = client_of(victim)
    pytest.fail(f"no kill in {KILL_ROUNDS} rounds caught a line in flight; make the lines longer")


def owner_pid(job: Job) -> int | None:
    """The pid in a running job's owner id (``host:pid:token``)."""
    return int(job.owner.split(":")[1]) if job.owner else None


def line_jobs(store_url: str, batch_id: str) -> list[Job]:
    async def read() -> list[Job]:
        store = job_store_from_url(store_url)
        await store.open()
        try:
            return [job for job in await store.list(limit=10_000) if job.request.get("batch_id") == batch_id]
        finally:
            await store.close()

    return asyncio.run(read())


def assert_answered_exactly_once(oai: OpenAI, store_url: str, batch_id: str, custom_ids: list[str]) -> None:
    done = wait_for(oai, batch_id, lambda b: b.status in ENDED, 240)
    assert done.status == "completed", done
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (LINES, LINES, 0)
    assert done.error_file_id is None and done.output_file_id is not None
    records = parse_batch_output(oai.files.content(done.output_file_id).read(), "/v1/completions")
    assert sorted(records) == sorted(custom_ids)
    jobs = line_jobs(store_url, batch_id)
    per_line = Counter(job.request["line"] for job in jobs)
    assert len(per_line) == LINES and set(per_line.values()) == {1}, "one job per line, never two"
    assert {job.state for job in jobs} == {JobState.SUCCEEDED}
    assert max(job.attempts for job in jobs) >= 2, "no line was running when the process died"
    by_job = {f"batch_req_{job.id}": job for job in jobs}
    for record in records.values():  # each answer is the one its job recorded
        job = by_job[record["id"]]
        assert job.request["custom_id"] == record["custom_id"] and job.result == record["response"]


@pytest.mark.timeout(300)
def test_a_batch_survives_kill_9_and_restart_on_sqlite(
    start_server: Callable[..., Server], tiny_model_dir: Path, tmp_path: Path
) -> None:
    env = tiny_env(tiny_model_dir)
    first = start_server(env)
    batch, custom_ids = create_batch(client_of(first))
    store_url = f"sqlite:///{first.job_store}"
    kill_9_with_a_line_in_flight(client_of(first), store_url, batch.id, first, lambda: start_server(env))
    second = start_server(env)  # same job store file and files folder
    assert_answered_exactly_once(client_of(second), f"sqlite:///{first.job_store}", batch.id, custom_ids)


@pytest.mark.timeout(300)
def test_a_batch_survives_kill_9_of_one_of_two_processes_on_redis(
    start_servers: Callable[..., list[Server]],
    start_server: Callable[..., Server],
    tiny_model_dir: Path,
    tmp_path: Path,
    redis_server: RedisServer,
) -> None:
    store_url = redis_server.url(db=6)
    with redis.Redis.from_url(store_url) as raw:
        raw.flushdb()
    env = tiny_env(tiny_model_dir, TEXTGEN_JOB_STORE=store_url, TEXTGEN_FILES_DIR=str(tmp_path / "shared-files"))
    victim, survivor = start_servers(env, 2)
    batch, custom_ids = create_batch(client_of(victim))
    kill_9_with_a_line_in_flight(client_of(victim), store_url, batch.id, victim, lambda: start_server(env))
    assert_answered_exactly_once(client_of(survivor), store_url, batch.id, custom_ids)
