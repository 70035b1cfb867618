"""Unit tests for the background-job runner (``textgen.workers.runner``) on a real SQLite store and a fake engine.

The fake engine implements the ``Engine`` protocol: ``submit`` hands back a real ``Handle`` that the test
resolves itself (``handle.finish``). Like the real engines it fails a handle whose cancel was requested
(unless told not to), so ``JobRunner.stop`` can drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from tests.support.waiting import wait_until
from textgen.config import Settings
from textgen.content_filter import ContentFilter
from textgen.engine.types import (
    Engine,
    EngineStats,
    FinishReason,
    GenerationRequest,
    GenerationResult,
    Handle,
    Priority,
    RequestTimings,
)
from textgen.errors import (
    DeadlineExceededError,
    EngineError,
    ModelUnavailableError,
    NotReadyError,
    PromptTooLongError,
    TextGenError,
)
from textgen.generation import COMPILING_PHASE, OUTPUT_REJECTED, GenerationService
from textgen.jobs.sqlite_store import SQLiteJobStore
from textgen.jobs.store import Job, JobState, died_in_phase_error
from textgen.metrics import Metrics
from textgen.workers.runner import JobRunner, RunnerConfig, owner_is_alive, process_owner_id

POLL_S = 0.05
WAIT_S = 5.0


class FakeEngine:
    """An ``Engine`` whose results the test decides; records every request and its priority."""

    name = "fake"

    def __init__(self) -> None:
        self.submitted: list[GenerationRequest] = []
        self.handles: list[Handle] = []
        self.max_in_flight = 0
        self.honour_cancel = True
        self.submit_error: TextGenError | None = None
        self._watcher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._watcher = asyncio.create_task(self._fail_cancelled_handles())

    async def stop(self, grace_s: float) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher

    def submit(self, request: GenerationRequest) -> Handle:
        if self.submit_error is not None:
            raise self.submit_error
        handle = Handle(request, asyncio.get_running_loop())
        self.submitted.append(request)
        self.handles.append(handle)
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        return handle

    @property
    def ready(self) -> bool:
        # Like the real engines: not ready exactly when submit() would refuse with NotReadyError.
        return not isinstance(self.submit_error, NotReadyError)

    def stats(self) -> EngineStats:
        return EngineStats(running=self.in_flight, waiting_interactive=0, waiting_background=0, tokens_per_s=0.0)

    @property
    def in_flight(self) -> int:
        return sum(not handle.done for handle in self.handles)

    def pending(self) -> list[Handle]:
        return [handle for handle in self.handles if not handle.done]

    async def _fail_cancelled_handles(self) -> None:
        """What a real engine does within a step: a cancelled sequence leaves with GenerationCancelledError."""
        while True:
            if self.honour_cancel:
                for handle in self.pending():
                    if handle.cancel_requested:
                        handle.fail_cancelled()
            await asyncio.sleep(0.005)  # the fake engine's step, at which a real one drops cancelled sequences


def make_result(text: str = "generated text", *, completion_tokens: int = 5) -> GenerationResult:
    return GenerationResult(
        text=text,
        prompt_tokens=3,
        completion_tokens=completion_tokens,
        finish_reason=FinishReason.LENGTH,
        timings=RequestTimings(queue_s=0.01, time_to_first_token_s=0.02, total_s=0.1),
    )


async def wait_for_state(store: SQLiteJobStore, job_id: str, state: JobState) -> Job:
    async def reached() -> bool:
        return (await store.get(job_id)).state is state

    await wait_until(reached)
    return await store.get(job_id)


def dead_pid() -> int:
    """The pid of a process that has already exited (and been reaped)."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteJobStore]:
    s = SQLiteJobStore(tmp_path / "runner-jobs.db")
    await s.open()
    yield s
    await s.close()


@pytest.fixture
async def engine() -> AsyncIterator[FakeEngine]:
    fake = FakeEngine()
    await fake.start()
    yield fake
    await fake.stop(0)


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(job_concurrency=4, job_poll_interval_s=POLL_S)


RunnerFactory = Callable[..., JobRunner]


@pytest.fixture
async def make_runner(store: SQLiteJobStore, engine: FakeEngine, settings: Settings) -> AsyncIterator[RunnerFactory]:
    """Build runners on the shared store and fake engine; every one is stopped at teardown."""
    runners: list[JobRunner] = []

    def build(
        *,
        concurrency: int | None = None,
        service_settings: Settings | None = None,
        lease_s: float = 30.0,
        max_attempts: int = 3,
    ) -> JobRunner:
        chosen = service_settings or settings
        service = GenerationService(engine, ContentFilter(["hate"]), chosen, "fake-model", Metrics())
        config = RunnerConfig(
            concurrency=concurrency or chosen.job_concurrency,
            poll_interval_s=chosen.job_poll_interval_s,
            ttl_s=chosen.job_ttl_s,
            lease_s=lease_s,
            max_attempts=max_attempts,
        )
        runner = JobRunner(store, service, config)
        runners.append(runner)
        return runner

    yield build
    # Let any handle the test left pending fail as cancelled, so stop() can drain.
    engine.honour_cancel = True
    for runner in runners:
        await asyncio.wait_for(runner.stop(), timeout=WAIT_S)


async def create_job(
    store: SQLiteJobStore, prompt: str = "Hello there", request_id: str = "req-1", **fields: object
) -> Job:
    return await store.create({"prompt": prompt, "max_new_tokens": 5, **fields}, request_id=request_id)


# --- the happy path ---------------------------------------------------------------------------------------


async def test_job_is_claimed_run_at_background_priority_and_succeeds(
    store: SQLiteJobStore, engine: FakeEngine, make_runner: RunnerFactory, settings: Settings
) -> None:
    job = await create_job(store, prompt="Tell me a story", request_id="req-story", temperature=0.0, seed=7)
    runner = make_runner()
    await runner.start()
    await wait_until(lambda: len(engine.handles) == 1)

    request = engine.submitted[0]
    assert request.priority is Priority.BACKGROUND
    assert request.prompt == "Tell me a story"
    assert request.request_id == "req-story"
    assert request.params.max_new_tokens == 5
    assert request.params.temperature == 0.0 and request.params.seed == 7
    assert request.timeout_s == settings.request_timeout_s
    running = await store.get(job.id)
    assert running.state is JobState.RUNNING and running.owner == runner.owner and running.attempts == 1
    assert runner.active_jobs == 1

    engine.handles[0].finish(make_result("Once upon a time", completion_tokens=4))
    done = await wait_for_state(store, job.id, JobState.SUCCEEDED)
    assert done.error is None
    assert done.finished_at is not None and done.started_at is not None
    assert done.attempts == 1
    assert done.result is not None
    assert done.result["generated_text"] == "Once upon a time"
    assert done.result["model"] == "fake-model"
    assert done.result["request_id"] == "req-story"
    assert done.result["prompt_tokens"] == 3
    assert done.result["completion_tokens"] == 4
    assert done.result["finish_reason"] == "length"
    assert done.result["timings"] == {"queue_s": 0.01, "time_to_first_token_s": 0.02, "total_s": 0.1}
    await wait_until(lambda: runner.active_jobs == 0)
    assert len(engine.submitted) == 1  # run exactly once


async def test_job_timeout_is_passed_to_the_engine(
    store: SQLiteJobStore, engine: FakeEngine, make_runner: RunnerFactory
) -> None:
    await create_job(store, timeout_s=12.0)
    await make_runner().start()
    await wait_until(lambda: len(engine.handles) == 1)
    assert engine.submitted[0].timeout_s == 12.0
    engine.handles[0].finish(make_result())


async def test_job_without_request_id_uses_the_job_id(
    store: SQLiteJobStore, engine: FakeEngine, make_runner: RunnerFactory
) -> None:
    job = await store.create({"prompt": "hi"}, request_id=None)
    await make_runner().start()
    await wait_until(lambda: len(engine.handles) == 1)
    assert engine.submitted[0].request_id == job.id
    engine.handles[0].finish(make_result())
    done = await wait_for_state(store, job.id, JobState.SUCCEEDED)
    assert done.result is not None and done.result["request_id"] == job.id


async def test_notify_claims_before_the_next_poll(
    store: SQLiteJobStore, engine: FakeEngine, make_runner: RunnerFactory, make_settings: Callable[..., Settings]
) -> None:
    runner = make_runner(service_settings=make_settings(job_poll_interval_s=30.0))
    await runner.start()
    await wait_until(lambda: runner.polls >= 1)  # the first (empty) poll is done; the next one is 30 s away
    await create_job(store)
    runner.notify()
    took = await wait_until(lambda: len(engine.handles) == 1, timeout_s=2.0)
    assert took < 2.0
    engine.handles[0].finish(make_result())


# --- output filter ------------------------------------------------------------------------------------------


async def test_blocked_output_is_redacted_in_the_stored_result(
    store: SQLiteJobStore, engine: FakeEngine, make_runner: RunnerFactory
) -> None:
    job = await create_job(store)
    await make_runner().start()
    await wait_until(lambda: len(engine.handles) == 1)
    engine.handles[0].finish(make_result("I hate rainy days"))
    done = await wait_for_state(store, job.id, JobState.SUCCEEDED)
    assert done.result is not None
    assert "hate" not in done.result["generated_text"]
    assert "[redacted]" in done.result["generated_text"]


async def test_blocked_output_fails_the_job_when_the_action_is_reject(
    store: SQLiteJobStore, engine: FakeEngine, make_runner: RunnerFactory, make_settings: Callable[..., Settings]
) -> None:
    job = await create_job(store)
    await make_runner(service_settings=make_settings(output_filter_action="reject", job_poll_interval_s=POLL_S)).start()
    await wait_until(lambda: len(engine.handles) == 1)
    engine.handles[0].finish(make_result("I hate rainy days"))
    done = await wait_for_state(store, job.id, JobState.FAILED)
    assert done.error == OUTPUT_REJECTED
    assert done.result is None


# --- failures -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [EngineError(), DeadlineExceededError(), PromptTooLongError("The prompt has 9000 tokens.")],
    ids=lambda e: type(e).__name__,
)
async def test_engine_error_fails_the_job_with_the_client_safe_message(
    store: SQLiteJobStore, engine: FakeEngine, make_runner: RunnerFactory, error: TextGenError
) -> None:
    job = await create_job(store)
    await make_runner().start()
    await wait_until(lambda: len(engine.handles) == 1)
    engine.handles[0].finish(None, error)
    done = await wait_for_state(store, job.id, JobState.FAILED)
    assert done.error == error.message
    assert done.result is None
    assert done.finished_at is not None


async def test_unexpected_error_is_not_leaked_to_the_job(
    store: SQLiteJobStore, engine: FakeEngine, make_runner: RunnerFactory
) -> None:
    job = await create_job(store, request_id="req-boom")
    await make_runner().start()
    await wait_until(lambda: len(engine.handles) == 1)
    engine.handles[0].finish(None, RuntimeError("secret internal detail at /srv/model"))
    done = await wait_for_state(store, job.id, JobState.FAILED)
    assert done.error is not None
    assert "secret" not in done.error
    assert "req-boom" in done.error


async def test_error_raised_by_submit_fails_the_job(
    store: SQLiteJobStore, engine: FakeEngine, make_runner: RunnerFactory
) -> None:
    engine.submit_error = EngineError("Generation failed.")
    job = await create_job(store)
    await make_runner().start()
    done = await wait_for_state(store, job.id, JobState.FAILED)
    assert done.error == "Generation failed."


async def test_invalid_stored_request_fails_without_reaching_the_engine(
    store: SQLiteJobStore, engine: FakeEngine, make_runner: RunnerFactory
) -> None:
    job = await store.create({"prompt": "", "max_new_tokens": -1}, request_id="req-bad")
    await make_runner().start()
    done = await wait_for_state(store, job.id, JobState.FAILED)
    assert done.error == "The stored request is no longer valid."
    assert engine.submitted == []


async def test_engine_not_ready_does_not_strand_the_job_in_running(
    store: SQLiteJobStore, engine: FakeEngine, make_runner: RunnerFactory
) -> None:
    engine.submit_error = NotReadyError()
    jobs = [await create_job(store, prompt=f"p{i}") for i in range(3)]
    runner = make_runner()
    await runner.start()
    await wait_until(lambda: runner.polls >= 10)
    assert runner.active_jobs == 0
    states = await store.states([job.id for job in jobs])
    # Acceptable outcomes: still queued (retried later) or failed; never an orphan in "running".
    assert JobState.RUNNING not in states.values(), states


# --- concurrency --------------------------------------------------------------------------------------------


async def test_concurrency_limit_is_respected(
    store: SQLiteJobStore, engine: FakeEngine, make_runner: RunnerFactory, make_settings: Callable[..., Settings]
) -> None:
    limited = make_settings(job_concurrency=2, job_poll_interval_s=POLL_S)
    jobs = [await create_job(store, prompt=f"prompt {i}", request_id=f"req-{i}") for i in range(5)]
    runner = make_runner(service_settings=limited)
    await runner.start()

    await wait_until(lambda: len(engine.handles) == 2)
    seen = runner.polls
    await wait_until(lambda: runner.polls >= seen + 4)  # several polls: still no third claim
    assert len(engine.submitted) == 2
    assert runner.active_jobs == 2
    assert await store.count(JobState.RUNNING) == 2
    assert await store.count(JobState.QUEUED) == 3

    finished = 0
    while finished < 5:
        await wait_until(lambda: engine.in_flight > 0)
        assert engine.in_flight <= 2
        engine.pending()[0].finish(make_result())
        finished += 1
    for job in jobs:
        await wait_for_state(store, job.id, JobState.SUCCEEDED)
    assert len(engine.submitted) == 5
    assert engine.max_in_flight <= 2
    assert [r.prompt for r in engine.submitted] == [f"prompt {i}" for i in range(5)]  # FIFO


# --- cancellation -------------------------------------------------------------------------------------------


async def test_cancel_local_cancels_the_handle_and_a_late_result_is_discarded(
    store: SQLiteJobStore, engine: FakeEngine, make_runner: RunnerFactory
) -> None:
    engine.honour_cancel = False  # this engine will finish the sequence anyway
    job = await create_job(store)
    runner = make_runner()
    await runner.start()
    await wait_until(lambda: len(engine.handles) == 1)
    handle = engine.handles[0]

    await store.cancel(job.id)
    runner.cancel_local(job.id)
    assert handle.cancel_requested is True

    handle.finish(make_result("too late"))
    await wait_until(lambda: runner.active_jobs == 0)
    cancelled = await store.get(job.id)
    assert cancelled.state is JobState.CANCELLED
    assert cancelled.result is None and cancelled.error is None


async def test_cancel_local_with_an_engine_that_honours_it(
    store: SQLiteJobStore, engine: FakeEngine, make_runner: RunnerFactory
) -> None:
    job = await create_job(store)
    runner = make_runner()
    await runner.start()
    await wait_until(lambda: len(engine.handles) == 1)
    await store.cancel(job.id)
    runner.cancel_local(job.id)
    await wait_until(lambda: runner.active_jobs == 0)
    assert (await store.get(job.id)).state is JobState.CANCELLED


async def test_cancel_local_of_an_unknown_job_is_a_no_op(make_runner: RunnerFactory) -> None:
    make_runner().cancel_local("no-such-job")


async def test_job_cancelled_elsewhere_is_cancelled_within_a_few_polls(
    store: SQLiteJobStore, engine: FakeEngine, make_runner: RunnerFactory
) -> None:
    job = await create_job(store)
    runner = make_runner()
    await runner.start()
    await wait_until(lambda: len(engine.handles) == 1)
    handle = engine.handles[0]

    await store.cancel(job.id)  # e.g. DELETE /jobs/{id} served by another worker process
    took = await wait_until(lambda: handle.cancel_requested, timeout_s=2.0)
    assert took < 5 * POLL_S + 0.5
    await wait_until(lambda: runner.active_jobs == 0)
    assert (await store.get(job.id)).state is JobState.CANCELLED


# --- shutdown and restart --------------------------------------------------------------------------------------


async def test_stop_requeues_running_jobs_and_the_next_runner_finishes_them(
    store: SQLiteJobStore, engine: FakeEngine, make_runner: RunnerFactory
) -> None:
    jobs = [await create_job(store, prompt=f"p{i}") for i in range(2)]
    first = make_runner()
    await first.start()
    await wait_until(lambda: len(engine.handles) == 2)
    first_handles = list(engine.handles)

    await asyncio.wait_for(first.stop(), timeout=WAIT_S)
    assert all(h.cancel_requested for h in first_handles)
    assert first.active_jobs == 0
    for job in jobs:
        requeued = await store.get(job.id)
        assert requeued.state is JobState.QUEUED
        assert requeued.owner is None
        assert requeued.started_at is None
        assert requeued.attempts == 1

    # A stopped runner claims nothing more: while the next runner (same poll interval) polls the store three
    # times, the stopped one polls not once, and only the next runner's handles are added.
    assert len(engine.handles) == 2
    stopped_polls = first.polls
    second = make_runner()
    assert second.owner != first.owner
    await second.start()
    await wait_until(lambda: len(engine.handles) == 4)
    await wait_until(lambda: second.polls >= 3, WAIT_S, "three polls of the next runner")
    assert first.polls == stopped_polls
    assert len(engine.handles) == 4
    for handle in engine.pending():
        handle.finish(make_result())
    for job in jobs:
        done = await wait_for_state(store, job.id, JobState.SUCCEEDED)
        assert done.attempts == 2
        assert done.owner == second.owner


async def test_stop_before_start_is_harmless(store: SQLiteJobStore, make_runner: RunnerFactory) -> None:
    job = await create_job(store)
    await make_runner().stop()
    assert (await store.get(job.id)).state is JobState.QUEUED


async def test_start_requeues_orphans_of_a_dead_process(
    store: SQLiteJobStore, engine: FakeEngine, make_runner: RunnerFactory
) -> None:
    orphan = await create_job(store, prompt="orphan")
    dead_owner = f"{socket.gethostname()}:{dead_pid()}:abcd1234"
    claimed = await store.claim_next(dead_owner, 30.0)
    assert claimed is not None and claimed.id == orphan.id and claimed.state is JobState.RUNNING

    remote = await create_job(store, prompt="remote")
    remote_owner = "some-other-host.invalid:1:abcd1234"
    assert (await store.claim_next(remote_owner, 30.0)) is not None

    runner = make_runner()
    await runner.start()
    await wait_until(lambda: len(engine.handles) == 1)
    assert engine.submitted[0].prompt == "orphan"
    engine.handles[0].finish(make_result())
    done = await wait_for_state(store, orphan.id, JobState.SUCCEEDED)
    assert done.attempts == 2
    assert done.owner == runner.owner

    # A job running on another host may be alive there: left alone.
    untouched = await store.get(remote.id)
    assert untouched.state is JobState.RUNNING
    assert untouched.owner == remote_owner
    assert len(engine.submitted) == 1


class BlockingGrammars:
    """A constraint compiler whose compiles wait until the test lets them finish (or fail)."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.compiled: dict[object, object] = {}

    def cached(self, constraint: object) -> object | None:
        return self.compiled.get(constraint)

    async def compile_async(self, constraint: object) -> object:
        self.started.set()
        await self.release.wait()
        self.compiled[constraint] = object()
        return self.compiled[constraint]


async def test_the_runner_marks_a_job_while_it_compiles_its_constraint(
    store: SQLiteJobStore, engine: FakeEngine, make_runner: RunnerFactory
) -> None:
    grammars = BlockingGrammars()
    engine.grammars = grammars  # type: ignore[attr-defined]
    job = await create_job(store, json_schema={"type": "object"})
    await make_runner().start()
    await asyncio.wait_for(grammars.started.wait(), WAIT_S)
    assert (await store.get(job.id)).phase == COMPILING_PHASE  # durable before the compile runs
    grammars.release.set()
    await wait_until(lambda: len(engine.handles) == 1)
    assert (await store.get(job.id)).phase is None  # cleared before generating: a kill -9 now is retried
    engine.handles[0].finish(make_result())
    assert (await wait_for_state(store, job.id, JobState.SUCCEEDED)).phase is None


async def test_a_job_whose_process_died_compiling_is_failed_at_once_not_retried(
    store: SQLiteJobStore, engine: FakeEngine, make_runner: RunnerFactory
) -> None:
    """The crash loop of issue 20: one bad constraint killed three processes in turn. Now the first
    death fails the job (attempt 1 of 3), while a job killed mid-generation is still run again."""
    dead_owner = f"{socket.gethostname()}:{dead_pid()}:abcd1234"
    crashing = await create_job(store, prompt="crashing", json_schema={"type": "object"})
    assert (await store.claim_next(dead_owner, 30.0)) is not None
    assert await store.set_phase(crashing.id, dead_owner, COMPILING_PHASE)  # what the dead runner recorded
    generating = await create_job(store, prompt="generating")
    assert (await store.claim_next(dead_owner, 30.0)) is not None

    runner = make_runner(max_attempts=3)
    await runner.start()
    failed = await store.get(crashing.id)
    assert failed.state is JobState.FAILED and failed.attempts == 1
    assert failed.error == died_in_phase_error(COMPILING_PHASE)
    await wait_until(lambda: len(engine.handles) == 1)
    assert [r.prompt for r in engine.submitted] == ["generating"]  # the crashing job never runs again
    engine.handles[0].finish(make_result())
    assert (await wait_for_state(store, generating.id, JobState.SUCCEEDED)).attempts == 2


# --- leases ------------------------------------------------------------------------------------------------------

SHORT_LEASE_S = 0.3
ELSEWHERE = "another-host.invalid:1:feedbeef"  # alive as far as this host can tell: only its lease speaks


async def test_lease_is_renewed_while_the_job_runs(
    store: SQLiteJobStore, engine: FakeEngine, make_runner: RunnerFactory
) -> None:
    job = await create_job(store)
    runner = make_runner(lease_s=SHORT_LEASE_S)
    await runner.start()
    await wait_until(lambda: len(engine.handles) == 1)
    first_lease = (await store.get(job.id)).lease_until

    polls = runner.polls

    async def renewed_for_three_more_leases() -> bool:
        lease_until = (await store.get(job.id)).lease_until
        return lease_until is not None and first_lease is not None and lease_until >= first_lease + 3 * SHORT_LEASE_S

    # Renewed until it reaches three leases past the first, with expired leases requeued at every poll meanwhile:
    # only renewals keep it here.
    await wait_until(renewed_for_three_more_leases, WAIT_S, "the lease renewed for three more leases")
    assert runner.polls >= polls + 3
    running = await store.get(job.id)
    assert running.state is JobState.RUNNING and running.owner == runner.owner and running.attempts == 1
    assert first_lease is not None and running.lease_until is not None and running.lease_until > first_lease
    engine.handles[0].finish(make_result())
    done = await wait_for_state(store, job.id, JobState.SUCCEEDED)
    assert done.attempts == 1 and len(engine.submitted) == 1


async def test_job_whose_process_stopped_renewing_is_reclaimed_and_its_late_result_discarded(
    store: SQLiteJobStore, engine: FakeEngine, make_runner: RunnerFactory
) -> None:
    job = await create_job(store)
    assert (await store.claim_next(ELSEWHERE, SHORT_LEASE_S)) is not None  # then that process goes silent
    runner = make_runner(lease_s=SHORT_LEASE_S)
    await runner.start()

    took = await wait_until(lambda: len(engine.handles) == 1)
    assert took >= SHORT_LEASE_S * 0.5  # not before the lease ran out
    engine.handles[0].finish(make_result("from the survivor"))
    done = await wait_for_state(store, job.id, JobState.SUCCEEDED)
    assert done.attempts == 2 and done.owner == runner.owner
    registry = runner._service.metrics.registry
    assert registry.get_sample_value("textgen_jobs_reclaimed_total", {"outcome": "requeued"}) == 1

    # The silent process wakes up and reports: too late, and nothing is overwritten.
    assert await store.finish(job.id, ELSEWHERE, JobState.FAILED, error="stale") is False
    final = await store.get(job.id)
    assert final.state is JobState.SUCCEEDED and final.error is None
    assert final.result is not None and final.result["generated_text"] == "from the survivor"


async def test_a_job_reclaimed_elsewhere_is_stopped_here_and_its_result_discarded(
    store: SQLiteJobStore, engine: FakeEngine, make_runner: RunnerFactory
) -> None:
    engine.honour_cancel = False  # the stale sequence finishes anyway
    job = await create_job(store)
    runner = make_runner(lease_s=SHORT_LEASE_S, concurrency=1)
    await runner.start()
    await wait_until(lambda: len(engine.handles) == 1)
    stale = engine.handles[0]

    # As if this process had stalled past its lease: the job went back and another process took it.
    await store.requeue_owned(runner.owner)
    assert (await store.claim_next(ELSEWHERE, 30.0)) is not None
    await wait_until(lambda: stale.cancel_requested, timeout_s=3 * SHORT_LEASE_S + 1.0)

    stale.finish(make_result("stale"))
    await wait_until(lambda: runner.active_jobs == 0)
    still = await store.get(job.id)
    assert still.state is JobState.RUNNING and still.owner == ELSEWHERE and still.result is None
    assert await store.finish(job.id, ELSEWHERE, JobState.SUCCEEDED, result={"generated_text": "fresh"})
    assert (await store.get(job.id)).result == {"generated_text": "fresh"}


async def test_a_job_that_keeps_losing_its_process_fails_after_max_attempts(
    store: SQLiteJobStore, engine: FakeEngine, make_runner: RunnerFactory
) -> None:
    job = await create_job(store)
    assert (await store.claim_next(ELSEWHERE, 0.05)) is not None
    runner = make_runner(lease_s=SHORT_LEASE_S, max_attempts=1)
    await runner.start()
    failed = await wait_for_state(store, job.id, JobState.FAILED)
    assert failed.attempts == 1
    assert failed.error is not None and "Abandoned after 1 attempt" in failed.error
    registry = runner._service.metrics.registry
    assert registry.get_sample_value("textgen_jobs_reclaimed_total", {"outcome": "failed"}) == 1
    assert engine.submitted == []  # never run again


# --- owner ids ------------------------------------------------------------------------------------------------


def test_process_owner_id_format() -> None:
    first, second = process_owner_id(), process_owner_id()
    host, pid, token = first.split(":")
    assert host == socket.gethostname()
    assert pid == str(os.getpid())
    assert len(token) == 8 and int(token, 16) >= 0
    assert first != second  # a fresh token each time


def test_owner_is_alive_for_its_own_owner() -> None:
    me = process_owner_id()
    assert owner_is_alive(me, me=me) is True


def test_owner_on_another_host_counts_as_alive() -> None:
    assert owner_is_alive("some-other-host.invalid:1:abcd1234", me=process_owner_id()) is True


def test_owner_with_a_dead_pid_is_dead() -> None:
    owner = f"{socket.gethostname()}:{dead_pid()}:abcd1234"
    assert owner_is_alive(owner, me=process_owner_id()) is False


def test_owner_with_a_live_pid_on_this_host_is_alive() -> None:
    process = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        owner = f"{socket.gethostname()}:{process.pid}:abcd1234"
        assert owner_is_alive(owner, me=process_owner_id()) is True
    finally:
        process.kill()
        process.wait()


def test_same_pid_with_another_token_is_an_earlier_incarnation() -> None:
    me = f"{socket.gethostname()}:{os.getpid()}:12345678"
    earlier = f"{socket.gethostname()}:{os.getpid()}:deadbeef"
    assert owner_is_alive(earlier, me=me) is False


@pytest.mark.parametrize("owner", ["garbage", "", "host:123", "host:notapid:token", "a:1:b:c"])
def test_malformed_owner_counts_as_alive(owner: str) -> None:
    assert owner_is_alive(owner, me=process_owner_id()) is True


def test_fake_engine_satisfies_the_engine_protocol() -> None:
    engine: Engine = FakeEngine()
    assert engine.name == "fake" and engine.ready


# --- several models (TEXTGEN_MODELS): the job runs on the model it names ------------------------------------


async def test_a_job_runs_on_its_model_and_waits_in_the_queue_while_busy_models_fill_the_budget(
    store: SQLiteJobStore, engine: FakeEngine, settings: Settings
) -> None:
    service = GenerationService(engine, ContentFilter([]), settings, "model-b", Metrics())
    refusals = [ModelUnavailableError("busy models fill TEXTGEN_MODEL_MEMORY", retry_after_s=0.05)]
    asked: list[str | None] = []

    @contextlib.asynccontextmanager
    async def service_for(model: str | None, timeout_s: float | None) -> AsyncIterator[GenerationService]:
        asked.append(model)
        if refusals:
            raise refusals.pop()
        yield service

    config = RunnerConfig(concurrency=2, poll_interval_s=POLL_S, ttl_s=60.0, lease_s=30.0, max_attempts=3)
    runner = JobRunner(store, service, config, service_for=service_for)
    job = await create_job(store, model="b")
    await runner.start()
    try:
        await wait_until(lambda: len(engine.handles) == 1, what="the job's second try reaching the engine")
        assert asked == ["b", "b"]  # handed back to the queue once, not failed
        engine.handles[0].finish(make_result())
        done = await wait_for_state(store, job.id, JobState.SUCCEEDED)
        assert done.result is not None and done.result["model"] == "model-b"
    finally:
        await asyncio.wait_for(runner.stop(), timeout=WAIT_S)


async def test_a_job_naming_a_model_that_cannot_load_fails_with_the_reason(
    store: SQLiteJobStore, engine: FakeEngine, settings: Settings
) -> None:
    service = GenerationService(engine, ContentFilter([]), settings, "fake-model", Metrics())

    @contextlib.asynccontextmanager
    async def service_for(model: str | None, timeout_s: float | None) -> AsyncIterator[GenerationService]:
        raise ModelUnavailableError("The model 'b' failed to load: no weights", retry_after_s=None)
        yield service  # pragma: no cover

    config = RunnerConfig(concurrency=2, poll_interval_s=POLL_S, ttl_s=60.0, lease_s=30.0, max_attempts=3)
    runner = JobRunner(store, service, config, service_for=service_for)
    job = await create_job(store, model="b")
    await runner.start()
    try:
        failed = await wait_for_state(store, job.id, JobState.FAILED)
        assert failed.error is not None and "failed to load" in failed.error
        assert engine.handles == []
    finally:
        await asyncio.wait_for(runner.stop(), timeout=WAIT_S)
