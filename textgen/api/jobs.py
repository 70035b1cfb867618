"""Job routes: read, list and cancel background jobs."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Query, Response
from sse_starlette import ServerSentEvent

from textgen.api.deps import ReaderDep, RequestIdDep, RunnerDep, StateDep, StoreDep
from textgen.api.errors import error_responses
from textgen.api.schemas.native import JobList, JobStateName, JobSummary, JobView
from textgen.api.sse import SSE_RESPONSE_DOC, error_event, event, sse_response
from textgen.engine.types import Handle
from textgen.errors import NotReadyError, TextGenError
from textgen.generation import GenerationService
from textgen.jobs.store import TERMINAL_STATES, Job, JobState, JobStore
from textgen.jobs.view import QueuePosition, job_record, job_summary_record, queue_estimate
from textgen.workers.runner import JobRunner

STREAM_POLL_S = 0.25
JOB_STREAM_SHUTDOWN = (
    "The server is shutting down: this job went back to the queue and finishes after a restart or on another "
    "replica. Reconnect to this stream to follow it."
)

router = APIRouter(prefix="/jobs", tags=["jobs"])


def job_view(job: Job, queue: QueuePosition | None = None) -> JobView:
    """``GET /jobs/{id}``'s body: the domain's record of the job (``textgen.jobs.view``), validated."""
    return JobView.model_validate(job_record(job, queue))


def job_summary(job: Job) -> JobSummary:
    return JobSummary.model_validate(job_summary_record(job))


@router.get(
    "",
    response_model=JobList,
    responses=error_responses(422, 429, 500),
    summary="List your jobs, newest first (summaries; the full job is on GET /jobs/{id})",
)
async def list_jobs(
    store: StoreDep,
    caller: ReaderDep,
    state: Annotated[JobStateName | None, Query(description="Only jobs in this state")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
) -> JobList:
    jobs = await store.list(state=JobState(state) if state else None, limit=limit, tenant=caller.visible_owner)
    return JobList(jobs=[job_summary(job) for job in jobs])


@router.get(
    "/{job_id}",
    response_model=JobView,
    responses=error_responses(404, 429, 500),
    summary="A job's state; while queued, its position and estimated start time",
)
async def get_job(job_id: str, store: StoreDep, caller: ReaderDep) -> JobView:
    job = await store.get(job_id, tenant=caller.visible_owner)
    return job_view(job, await queue_estimate(store, job))


@router.post(
    "/{job_id}/cancel",
    response_model=JobView,
    responses=error_responses(404, 409, 500),
    summary="Cancel a queued or running job; the job stays readable, in state cancelled",
)
@router.delete(
    "/{job_id}",
    response_model=JobView,
    responses=error_responses(404, 409, 429, 500),
    summary="Cancel a queued or running job (same as POST /jobs/{job_id}/cancel; the job is not deleted)",
)
async def cancel_job(job_id: str, store: StoreDep, runner: RunnerDep, state: StateDep, caller: ReaderDep) -> JobView:
    job = await store.cancel(job_id, tenant=caller.visible_owner)
    if job.started_at is None:  # it never ran: its submitter gets the whole reservation back
        await state.service.refund_unused(job.reservation, None)
    runner.cancel_local(job_id)
    runner.notify()  # its webhook, if any, is due now
    return job_view(job)


async def job_events(
    job_id: str, store: JobStore, runner: JobRunner, service: GenerationService, request_id: str
) -> AsyncIterator[ServerSentEvent]:
    """`state` events on every change, `token` events while the job runs in this process (replayed from
    its first token when connecting late; a job that ran unseen, in another worker or between two looks,
    has its text replayed as one token event), then `done` with the finished job. Leaving does not cancel.

    At shutdown the job goes back to the queue (it finishes after a restart or on another replica), so the
    stream ends with an `error` event (503) saying so: the client reconnects to follow it."""
    last_state: JobState | None = None
    streamed: Handle | None = None
    try:
        while True:
            if runner.stopping:
                yield error_event(NotReadyError(JOB_STREAM_SHUTDOWN), request_id)
                return
            job = await store.get(job_id)
            if job.state is not last_state:
                last_state = job.state
                yield event("state", {"state": job.state.value})
            if job.state in TERMINAL_STATES:
                if streamed is None and job.result:
                    # It ran between two looks (or elsewhere): replay its text as one token event.
                    yield event("token", {"text": job.result.get("generated_text", "")})
                yield event("done", job_view(job).model_dump(mode="json"))
                return
            handle = runner.local_handle(job_id)
            # A handle is streamed once; until the runner records its result the store still says running.
            if job.state is JobState.RUNNING and handle is not None and handle is not streamed:
                streamed = handle
                with contextlib.suppress(TextGenError):  # the job's own outcome arrives via the store
                    async for text in service.stream_text(handle, cancel_on_exit=False):
                        yield event("token", {"text": text})
            else:
                await asyncio.sleep(STREAM_POLL_S)
    except Exception as error:
        yield error_event(error, request_id)


@router.get(
    "/{job_id}/stream",
    responses={**SSE_RESPONSE_DOC, **error_responses(404, 429, 500)},
    summary="Follow a job live (Server-Sent Events); disconnecting does not cancel it",
)
async def stream_job(
    job_id: str, store: StoreDep, runner: RunnerDep, state: StateDep, request_id: RequestIdDep, caller: ReaderDep
) -> Response:
    await store.get(job_id, tenant=caller.visible_owner)  # unknown (or others') ids: a plain 404 first
    with state.streams.take(caller.rate_key) as slot:
        events = job_events(job_id, store, runner, state.service, request_id)
        return sse_response(slot.attach(events), request_id)
