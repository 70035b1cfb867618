"""Job routes: read, list and cancel background jobs."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query

from models import JobList, JobStateName, JobView, TextGenerationResponse
from textgen.api.deps import RunnerDep, StoreDep
from textgen.api.errors import error_responses
from textgen.jobs.store import Job, JobState

router = APIRouter(prefix="/jobs", tags=["jobs"])


def _time(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


def job_view(job: Job) -> JobView:
    return JobView(
        job_id=job.id,
        state=job.state.value,
        request=job.request,
        result=TextGenerationResponse.model_validate(job.result) if job.result else None,
        error=job.error,
        request_id=job.request_id,
        created_at=datetime.fromtimestamp(job.created_at, UTC),
        started_at=_time(job.started_at),
        finished_at=_time(job.finished_at),
        attempts=job.attempts,
    )


@router.get("", response_model=JobList, responses=error_responses(422, 500), summary="List jobs, newest first")
async def list_jobs(
    store: StoreDep,
    state: Annotated[JobStateName | None, Query(description="Only jobs in this state")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
) -> JobList:
    jobs = await store.list(state=JobState(state) if state else None, limit=limit)
    return JobList(jobs=[job_view(job) for job in jobs])


@router.get("/{job_id}", response_model=JobView, responses=error_responses(404, 500), summary="A job's state")
async def get_job(job_id: str, store: StoreDep) -> JobView:
    return job_view(await store.get(job_id))


@router.delete(
    "/{job_id}",
    response_model=JobView,
    responses=error_responses(404, 409, 500),
    summary="Cancel a queued or running job",
)
async def cancel_job(job_id: str, store: StoreDep, runner: RunnerDep) -> JobView:
    job = await store.cancel(job_id)
    runner.cancel_local(job_id)
    return job_view(job)
