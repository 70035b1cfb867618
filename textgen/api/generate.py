"""Generation routes: validate, check the prompt, submit to the engine (or the job store), await."""

from __future__ import annotations

import asyncio
import contextlib

from fastapi import APIRouter, Request, Response

from models import JobAccepted, TextGenerationRequest, TextGenerationResponse
from textgen.api.deps import RequestIdDep, RunnerDep, ServiceDep, StateDep, StoreDep
from textgen.api.errors import error_responses
from textgen.engine.types import GenerationResult, Handle, Priority
from textgen.errors import GenerationCancelledError

router = APIRouter(tags=["generation"])


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def result_unless_disconnected(request: Request, handle: Handle) -> GenerationResult:
    """Await the result; if the client goes away first, cancel so the sequence leaves the batch."""
    result = asyncio.ensure_future(handle.result())
    disconnect = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({result, disconnect}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnect.cancel()
    if not result.done():
        handle.cancel()
        result.cancel()
        with contextlib.suppress(asyncio.CancelledError, GenerationCancelledError):
            await result
        raise GenerationCancelledError("The client disconnected.")
    return result.result()


@router.post(
    "/generate",
    response_model=TextGenerationResponse,
    responses=error_responses(400, 422, 503, 504, 500),
    summary="Generate text and wait for it",
)
async def generate(
    body: TextGenerationRequest, request: Request, service: ServiceDep, request_id: RequestIdDep
) -> TextGenerationResponse:
    service.check_prompt(body.prompt, request_id)
    handle = service.submit(body, request_id, Priority.INTERACTIVE)
    result = await result_unless_disconnected(request, handle)
    return service.response(result, request_id)


@router.post(
    "/generate_background",
    status_code=202,
    response_model=JobAccepted,
    responses=error_responses(400, 422, 500),
    summary="Queue a durable background job; poll the returned status URL",
)
async def generate_background(
    body: TextGenerationRequest,
    response: Response,
    state: StateDep,
    store: StoreDep,
    runner: RunnerDep,
    request_id: RequestIdDep,
) -> JobAccepted:
    state.service.check_prompt(body.prompt, request_id)
    job = await store.create(body.model_dump(mode="json"), request_id=request_id)
    runner.notify()
    status_url = f"/jobs/{job.id}"
    response.headers["Location"] = status_url
    return JobAccepted(request_id=request_id, job_id=job.id, state="queued", status_url=status_url)
