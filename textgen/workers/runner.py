"""The job runner: claims queued jobs from the store and runs them on the engine at background priority.

One runner per process (per replica). Jobs are claimed up to ``TEXTGEN_JOB_CONCURRENCY`` at a time, so
background work never floods the engine's queue; interactive requests are admitted ahead of them by the
engine. The runner is a leased poll loop (``textgen.workers.loop.PollLoop``): each claimed job holds a
lease (``TEXTGEN_JOB_LEASE_S``) that the loop renews every third of the lease; a job this process no
longer holds (cancelled, or reclaimed after a stall) is stopped here. Every poll, any runner puts jobs
whose lease expired back in the queue, so the jobs of a process that died are run again by the survivors
without waiting for it to restart; at start a dead process on this host is recognised at once. At
shutdown this process hands its jobs back. A job's result is written only while this process still owns
it, so a job is finished once.

A job killed mid-generation (an operator's kill -9, a crash) is run again, up to
``TEXTGEN_JOB_MAX_ATTEMPTS`` times. Work that can itself kill the process (compiling a new
constraint) is different: the runner records that phase on the job for the duration
(``JobStore.set_phase``, through ``generation.risky_phase``), and a job whose process died in it is
failed at once with the reason instead of being retried into a crash loop.

When webhooks are configured, the runner starts and stops their delivery (``textgen.workers.webhooks``)
with its own loop and wakes it when a job ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from textgen.config import Settings
from textgen.engine.types import Handle, Priority
from textgen.errors import (
    GenerationCancelledError,
    ModelUnavailableError,
    NotReadyError,
    TextGenError,
)
from textgen.generation import GenerationService, RiskyPhase, risky_phase
from textgen.jobs.store import Job, JobState, JobStore
from textgen.services.native import text_request
from textgen.services.requests import TextGenerationRequest
from textgen.workers.loop import STORE_CONDITIONS, PollLoop, Wait, wait_event
from textgen.workers.webhooks import JobWebhooks

logger = logging.getLogger(__name__)

PURGE_EVERY_S = 60.0

JobOutcome = tuple[JobState, dict[str, Any]]
# Runs a job whose request names a ``kind`` (e.g. a batch line); ``track`` hands the runner the engine
# handle so cancellation and shutdown reach it. Raises NotReadyError / GenerationCancelledError like
# the plain path; returns the state and the fields to record.
JobExecutor = Callable[[Job, str, Callable[[Handle], None]], Awaitable[JobOutcome]]
# Builds an executor once the service exists (batch lines: textgen.services.batch_lines.batch_line_executor);
# its second argument is the model registry (textgen.services.model_registry), which picks each job's model.
ExecutorFactory = Callable[[GenerationService, Any], JobExecutor]
# The generation service of the model a job names (None: the default), loaded if it is not, held while the
# job runs: ``textgen.services.model_registry.ModelRegistry.service_for``.
ServiceFor = Callable[[str | None, float | None], AbstractAsyncContextManager[GenerationService]]


def process_owner_id() -> str:
    """host:pid:token — the token tells this process apart from an earlier one with the same pid."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def owner_is_alive(owner: str, *, me: str) -> bool:
    """Whether the process named by ``owner`` may still be running (unknown hosts count as alive)."""
    try:
        host, pid_text, _token = owner.split(":")
        pid = int(pid_text)
    except ValueError:
        return True
    if owner == me:
        return True
    if host != socket.gethostname():
        return True
    if pid == os.getpid():
        return False  # same pid, different token: an earlier incarnation of this process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class RunnerConfig:
    """How the runner paces itself: ``TEXTGEN_JOB_CONCURRENCY``, ``_POLL_INTERVAL_S``, ``_TTL_S``,
    ``TEXTGEN_IDEMPOTENCY_TTL_S``, ``TEXTGEN_JOB_LEASE_S`` and ``_MAX_ATTEMPTS``."""

    concurrency: int
    poll_interval_s: float
    ttl_s: float
    idempotency_ttl_s: float = 24 * 3600.0
    lease_s: float = 30.0
    max_attempts: int = 3

    @classmethod
    def from_settings(cls, settings: Settings) -> RunnerConfig:
        return cls(
            concurrency=settings.job_concurrency,
            poll_interval_s=settings.job_poll_interval_s,
            ttl_s=settings.job_ttl_s,
            idempotency_ttl_s=settings.idempotency_ttl_s,
            lease_s=settings.job_lease_s,
            max_attempts=settings.job_max_attempts,
        )


class JobRunner:
    def __init__(
        self,
        store: JobStore,
        service: GenerationService,
        config: RunnerConfig,
        *,
        owner: str | None = None,
        webhooks: JobWebhooks | None = None,
        executors: Mapping[str, JobExecutor] | None = None,
        wait: Wait = wait_event,
        service_for: ServiceFor | None = None,
    ) -> None:
        self.owner = owner or process_owner_id()
        self._executors = dict(executors or {})
        self._config = config
        self._webhooks = webhooks
        self._store = store
        self._service = service
        self._service_for = service_for or self._only_service
        self._active: dict[str, Handle | None] = {}
        self._handles: dict[str, list[Handle]] = {}  # every engine handle of a running job (refunds, cancel)
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._last_purge = 0.0
        self.loop = PollLoop(
            "textgen-job-runner",
            self._poll,
            poll_interval_s=config.poll_interval_s,
            renew=self._renew_leases,
            lease_s=config.lease_s,
            wait=wait,
        )
        self._paused_until = 0.0

    async def start(self) -> None:
        # A dead process on this host is recognised now: its leases are expired at once.
        orphaned = await self._store.requeue_orphaned(lambda owner: owner_is_alive(owner, me=self.owner))
        await self._requeue_expired("left running by a process that died" if orphaned else None)
        self.loop.start()
        if self._webhooks is not None:
            self._webhooks.start()

    def stop_claiming(self) -> None:
        """Claim nothing more from now on (shutdown calls this at once: ``stop`` is awaited only after the
        batch coordinator has stopped, and the poll loop must not claim a job in between)."""
        self._stopping = True

    async def stop(self) -> None:
        """Stop claiming, cancel running jobs and deliveries here and hand them back to the store."""
        self.stop_claiming()
        await self.loop.stop()
        if self._webhooks is not None:
            await self._webhooks.stop()
        for handles in self._handles.values():
            for handle in handles:
                handle.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks))
        try:
            requeued = await self._store.requeue_owned(self.owner)
        except STORE_CONDITIONS as error:
            # Shutdown must complete anyway; the leases bring these jobs back.
            logger.warning(
                "Could not hand running jobs back at shutdown (%s); they are reclaimed when their leases expire "
                "(TEXTGEN_JOB_LEASE_S)",
                error.message,
            )
            return
        if requeued:
            logger.info("Handed %d running job(s) back to the queue for the next start", requeued)

    def notify(self) -> None:
        """A job was just submitted here: claim it now rather than at the next poll."""
        self.loop.notify()

    @property
    def polls(self) -> int:
        """Completed polls: a positive signal tests (and debugging) can wait for."""
        return self.loop.polls

    def local_handle(self, job_id: str) -> Handle | None:
        """The engine handle of a job running in this process (for live streaming), if any."""
        return self._active.get(job_id)

    def cancel_local(self, job_id: str) -> None:
        for handle in self._handles.get(job_id, ()):
            handle.cancel()

    def _track(self, job_id: str, handle: Handle) -> None:
        self._active[job_id] = handle
        self._handles.setdefault(job_id, []).append(handle)

    @property
    def stopping(self) -> bool:
        """Shutdown began: running jobs are being handed back, nothing new is claimed here."""
        return self._stopping

    @property
    def active_jobs(self) -> int:
        return len(self._active)

    async def _poll(self) -> bool:
        await self._requeue_expired()
        await self._claim_available()
        await self._cancel_jobs_cancelled_elsewhere()
        await self._purge_if_due()
        return False

    async def _renew_leases(self) -> None:
        """Renew the leases of the jobs running here; stop those this process no longer holds."""
        running = list(self._active)
        if not running:
            return
        held = await self._store.renew(self.owner, running, self._config.lease_s)
        for job_id in set(running) - held:
            if job_id in self._active:
                logger.warning("Job %s is no longer held here (cancelled or reclaimed); stopping it", job_id)
                self.cancel_local(job_id)

    async def _requeue_expired(self, why: str | None = None) -> None:
        requeued, failed = await self._store.requeue_expired(self._config.max_attempts)
        self._service.metrics.observe_reclaimed(requeued, failed)
        if requeued:
            why = why or "whose lease expired (their process died or hung)"
            logger.warning("Re-queued %d job(s) %s", requeued, why)
        if failed:
            logger.error(
                "Failed %d job(s) whose process died during a risky step or %d times (see each job's error)",
                failed,
                self._config.max_attempts,
            )

    async def _claim_available(self) -> None:
        if time.monotonic() < self._paused_until or not self._service.engine.ready:
            return
        while len(self._active) < self._config.concurrency and not self._stopping:
            job = await self._store.claim_next(self.owner, self._config.lease_s)
            if job is None:
                return
            self._active[job.id] = None
            task = asyncio.create_task(self._run(job), name=f"job-{job.id}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _cancel_jobs_cancelled_elsewhere(self) -> None:
        """Another process (or worker) may have cancelled a job that runs here."""
        if not self._active:
            return
        states = await self._store.states(list(self._active))
        for job_id, state in states.items():
            if state is not JobState.RUNNING:
                self.cancel_local(job_id)

    async def _purge_if_due(self) -> None:
        if time.monotonic() - self._last_purge < PURGE_EVERY_S:
            return
        self._last_purge = time.monotonic()
        purged = await self._store.purge_finished(self._config.ttl_s)
        await self._store.purge_idempotency(self._config.idempotency_ttl_s)
        if purged:
            logger.info("Purged %d finished job(s) older than TEXTGEN_JOB_TTL_S", purged)

    def _phase_marker(self, job: Job) -> RiskyPhase:
        """Records a risky phase on the job while it runs (see the module docstring)."""

        @contextlib.asynccontextmanager
        async def marked(phase: str) -> AsyncIterator[None]:
            await self._store.set_phase(job.id, self.owner, phase)
            try:
                yield
            finally:
                try:
                    await self._store.set_phase(job.id, self.owner, None)
                except STORE_CONDITIONS:
                    # The job goes on; only if this process then dies is it failed instead of retried.
                    logger.warning("Job %s: could not clear its %r marker", job.id, phase)

        return marked

    async def _run(self, job: Job) -> None:
        request_id = job.request_id or job.id
        logger.info("Job %s started (attempt %d)", job.id, job.attempts, extra={"request_id": request_id})
        risky_phase.set(self._phase_marker(job))  # this task's context only
        self._service.metrics.observe_job_started(job.created_at, job.started_at)
        try:
            outcome = await self._generate(job, request_id)
            if outcome is not None:
                if await self._finish_retrying(job, *outcome):
                    await self._service.refund_unused(job.reservation, self._handles.get(job.id))
            elif not self._stopping and (await self._store.states([job.id])).get(job.id) in (JobState.CANCELLED, None):
                # Cancelled, or deleted (DELETE /v1/responses cancels, then deletes): the unused tokens go back.
                await self._service.refund_unused(job.reservation, self._handles.get(job.id))
        except STORE_CONDITIONS:
            # The outcome could not be recorded even after retrying: the lease runs out and the job runs
            # again (here or elsewhere) once the store takes writes again.
            logger.warning("Job %s: its result could not be stored; the job will run again", job.id)
        finally:
            self._active.pop(job.id, None)
            self._handles.pop(job.id, None)
            self.loop.notify()  # a slot is free
            if self._webhooks is not None:
                self._webhooks.notify()  # and its webhook may be due

    async def _generate(self, job: Job, request_id: str) -> tuple[JobState, dict[str, Any]] | None:
        """Run the job on the engine: the state and fields to record, or None when there is nothing to
        record (cancelled, or handed back because the engine is not taking work)."""
        try:
            executor = self._executors.get(str(job.request.get("kind", "")))
            if executor is not None:
                return await executor(job, request_id, lambda handle: self._track(job.id, handle))
            body = TextGenerationRequest.model_validate(job.request)
            request = text_request(body)
            async with self._service_for(body.model, request.timeout_s) as service:
                await service.prepare_request(request)  # compiles off the event loop, marked as risky
                handle = service.submit_request(request, request_id, Priority.BACKGROUND, tenant=job.tenant)
                self._track(job.id, handle)
                result = await service.response(await handle.result(), request_id)
            return JobState.SUCCEEDED, {"result": result.to_dict()}
        except ModelUnavailableError as error:
            if error.retry_after_s is None or self._stopping:
                return JobState.FAILED, {"error": error.message}
            # Busy models fill TEXTGEN_MODEL_MEMORY: the job waits in the queue for room, not in "running".
            await self._store.release(job.id, self.owner)
            self._paused_until = time.monotonic() + error.retry_after_s
            return None
        except NotReadyError:
            if not self._stopping:
                # The engine is not taking work (e.g. draining); the job must not sit in "running",
                # and claiming again at once would only spin.
                await self._store.release(job.id, self.owner)
                self._paused_until = time.monotonic() + self._config.poll_interval_s
            return None
        except GenerationCancelledError:
            if not self._stopping:
                logger.info("Job %s cancelled", job.id, extra={"request_id": request_id})
            return None
        except TextGenError as error:
            return JobState.FAILED, {"error": error.message}
        except ValidationError:
            return JobState.FAILED, {"error": "The stored request is no longer valid."}
        except Exception:
            logger.exception("Job %s failed", job.id, extra={"request_id": request_id})
            return JobState.FAILED, {"error": f"Internal error; see logs for request id {request_id}."}

    @contextlib.asynccontextmanager
    async def _only_service(self, model: str | None, timeout_s: float | None) -> AsyncIterator[GenerationService]:
        """Without a registry: the one service (a runner built by hand, in tests)."""
        yield self._service

    async def _finish_retrying(self, job: Job, state: JobState, outcome: dict[str, Any]) -> bool:
        """Record the outcome; while the store refuses writes (full disk, outage), keep trying for about
        one lease period instead of leaving the job running until its lease expires."""
        delay_s, waited_s = 0.5, 0.0
        while True:
            try:
                return await self._finish(job, state, outcome)
            except STORE_CONDITIONS:
                if self._stopping or waited_s >= self._config.lease_s:
                    raise
            await asyncio.sleep(delay_s)
            waited_s += delay_s
            delay_s = min(delay_s * 2, 5.0)

    async def _finish(self, job: Job, state: JobState, outcome: dict[str, Any]) -> bool:
        took = await self._store.finish(job.id, self.owner, state, **outcome)
        level = logging.INFO if took else logging.WARNING
        message = "Job %s %s" if took else "Job %s result (%s) discarded: no longer owned here"
        logger.log(level, message, job.id, state.value, extra={"request_id": job.request_id or job.id})
        return took
