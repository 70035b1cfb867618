"""OpenAI's Responses API: ``POST /v1/responses`` (plain, ``stream``, ``background``), ``GET`` / ``DELETE
/v1/responses/{id}`` and ``POST /v1/responses/{id}/cancel``, so the official client's ``responses.create``
/ ``stream`` / ``retrieve`` / ``delete`` / ``cancel`` work unchanged.

The translation to and from the chat path and the storage in the job store are the service layer's
(``textgen.services.responses``); these routes add HTTP: SSE (named events, no ``[DONE]``, as OpenAI's),
disconnects, the stream cap, errors in OpenAI's shape (``OpenAIRoute``). Stored responses belong to the
caller's tenant: another tenant's id is a 404, as an unknown one.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from sse_starlette import ServerSentEvent

from textgen.api.deps import CallerDep, ReaderDep, RequestIdDep, RunnerDep, StateDep, StoreDep
from textgen.api.generate import results_unless_disconnected
from textgen.api.openai import ERROR_DOCS, GENERATION_DOCS, OpenAIRoute
from textgen.api.schemas.openai import OpenAIError
from textgen.api.schemas.responses import InputItemList, ResponseDeleted, ResponseObject
from textgen.api.sse import sse_response
from textgen.engine.types import GenerationResult, Handle, to_client_error
from textgen.errors import InvalidRequestError, TextGenError
from textgen.generation import GenerationService
from textgen.jobs.store import TERMINAL_STATES, Job, JobStore
from textgen.services.openai import (
    chat_chunks,
    chat_max_tokens,
    checked_chat_prompt,
    choice_params,
    grant_choices,
    names_no_output_limit,
    prepare_chat,
    submit_choices,
)
from textgen.services.responses import (
    PreparedResponse,
    ResponseEvents,
    chat_json,
    completed_response,
    input_items_page,
    job_id_of,
    new_response_id,
    prepare_response,
    response_stream,
    sse_payload,
    store_finished,
    stored_response,
)
from textgen.services.responses_types import ResponseRequest
from textgen.state import AppState
from textgen.workers.runner import JobRunner

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["openai"], route_class=OpenAIRoute)
NOT_FOUND_DOC = {"model": OpenAIError, "description": "No such stored response (or another tenant's)"}
STORE_FULL_DOC = {"model": OpenAIError, "description": "The job store cannot store anything right now (out of space)"}
STORED_DOCS: dict[int | str, dict[str, Any]] = {
    **{code: ERROR_DOCS[code] for code in (400, 401, 413, 429, 500, 503)},
    404: NOT_FOUND_DOC,
    507: STORE_FULL_DOC,
}
CREATE_DOCS: dict[int | str, dict[str, Any]] = {
    **GENERATION_DOCS,
    404: {
        **NOT_FOUND_DOC,
        "description": "Unknown model (model_not_found), or previous_response_id names no stored response of yours",
    },
    507: STORE_FULL_DOC,
}


async def _results(
    request: Request, service: GenerationService, handles: Sequence[Handle], request_id: str, caller: str
) -> list[GenerationResult]:
    return [await service.finish(r, request_id, caller) for r in await results_unless_disconnected(request, handles)]


async def _events(
    events: AsyncIterator[dict[str, Any]], translator: ResponseEvents, request_id: str
) -> AsyncIterator[ServerSentEvent]:
    """Named SSE events; a failure after the stream started ends it with ``error`` and ``response.failed``."""
    try:
        async for item in events:
            yield ServerSentEvent(data=sse_payload(item), event=item["type"])
    except Exception as error:
        client_error = to_client_error(error)
        if client_error is not error:
            logger.error("Response stream failed", exc_info=error, extra={"request_id": request_id})
        assert isinstance(client_error, TextGenError)
        for item in translator.failed(client_error):
            yield ServerSentEvent(data=sse_payload(item), event=item["type"])


@router.post(
    "/responses",
    response_model=ResponseObject,
    responses=CREATE_DOCS,
    summary="OpenAI Responses API: create a response (stream: named events; background: a durable job)",
)
async def create_response(
    body: ResponseRequest,
    request: Request,
    state: StateDep,
    store: StoreDep,
    runner: RunnerDep,
    request_id: RequestIdDep,
    caller: CallerDep,
    reader: ReaderDep,
) -> Any:
    # 404 model_not_found before any work; the model is loaded now (its template renders the prompt)
    async with state.registry.use(body.model, state.settings.request_timeout_s) as serving:
        service = serving.service
        prepared = await prepare_response(service, store, body, reader.visible_owner)
        chat = prepared.chat
        prompt = await checked_chat_prompt(service, serving.model.tokenizer, chat, request_id)
        await prepare_chat(service, chat)  # compile its constraint (tool calls, text.format) before queueing
        owner = reader.owner_id
        if body.background:
            return await _queue(prepared, prompt, service, store, runner, request_id, caller, owner)

        async def keep(response: dict[str, Any]) -> None:
            if body.stores:
                await store_finished(store, prepared, response, request_id, owner)

        chat_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(prepared.skeleton["created_at"])
        if body.stream:
            with state.streams.take(caller) as slot:
                grant, max_tokens = await grant_choices(service, caller, [prompt], chat, chat_max_tokens(service, chat))
                handles = await service.submit_granted(
                    grant, lambda: submit_choices(service, [prompt], chat, max_tokens, request_id, tenant=caller)
                )
                chunks = chat_chunks(service, handles, chat, chat_id, created, request_id, caller)
                translator = ResponseEvents(prepared.skeleton)
                events = _events(response_stream(chunks, translator, keep), translator, request_id)
                return sse_response(slot.attach(events), request_id)
        grant, max_tokens = await grant_choices(service, caller, [prompt], chat, chat_max_tokens(service, chat))
        handles = await service.submit_granted(
            grant, lambda: submit_choices(service, [prompt], chat, max_tokens, request_id, tenant=caller)
        )
        results = await _results(request, service, handles, request_id, caller)
        response = completed_response(prepared.skeleton, chat_json(service, chat, results, chat_id, created))
        await keep(response)
        return JSONResponse(response)


async def _queue(
    prepared: PreparedResponse,
    prompt: str,
    service: GenerationService,
    store: JobStore,
    runner: JobRunner,
    request_id: str,
    caller: str,
    owner: str,
) -> JSONResponse:
    """``background: true``: reserve the caller's tokens now (refunded by whoever ends the job), store the
    job; the runner runs it at background priority. Its response is ``queued`` until then."""
    chat = prepared.chat
    prompt_tokens = await service.count_prompt_tokens([prompt])
    params = choice_params([prompt], chat, chat_max_tokens(service, chat))
    grant = await service.grant(caller, params, prompt_tokens, open_ended=names_no_output_limit(chat), flexible=False)
    reservation = grant.reservation
    try:
        job = await store.create(
            prepared.stored_request(to_run=True, max_new_tokens=grant.max_new_tokens),
            request_id=request_id,
            tenant=owner,
            reservation=reservation.encode() if reservation else None,
        )
    except BaseException:
        await service.rate_limiter.refund(reservation, reservation.tokens if reservation else 0)
        raise
    runner.notify()
    return JSONResponse(stored_response(job))


@router.get(
    "/responses/{response_id}",
    response_model=ResponseObject,
    responses=STORED_DOCS,
    summary="A stored response (yours only): its output once it ended, else its status",
)
async def get_response(
    response_id: str,
    store: StoreDep,
    reader: ReaderDep,
    stream: Annotated[bool, Query(description="Not supported: false only")] = False,
) -> JSONResponse:
    if stream:
        raise InvalidRequestError(
            "stream: replaying a stored response as a stream is not supported; omit it.", param="stream"
        )
    job = await store.get(job_id_of(response_id), tenant=reader.visible_owner)
    return JSONResponse(stored_response(job))


@router.get(
    "/responses/{response_id}/input_items",
    response_model=InputItemList,
    responses=STORED_DOCS,
    summary="The conversation a stored response answered (its input, the previous responses' included)",
)
async def list_input_items(
    response_id: str,
    store: StoreDep,
    reader: ReaderDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    order: Annotated[Literal["asc", "desc"], Query()] = "desc",
    after: Annotated[str | None, Query(max_length=128)] = None,
) -> JSONResponse:
    job = await store.get(job_id_of(response_id), tenant=reader.visible_owner)
    return JSONResponse(input_items_page(job, limit=limit, order=order, after=after))


@router.delete(
    "/responses/{response_id}",
    response_model=ResponseDeleted,
    responses={**STORED_DOCS, 409: {"model": OpenAIError, "description": "It could not be cancelled first"}},
    summary="Delete a stored response (a background one still running is cancelled first)",
)
async def delete_response(
    response_id: str, store: StoreDep, runner: RunnerDep, state: StateDep, reader: ReaderDep
) -> JSONResponse:
    job_id = job_id_of(response_id)
    job = await store.get(job_id, tenant=reader.visible_owner)
    stored_response(job)  # a 404 for jobs that are not responses
    if job.state not in TERMINAL_STATES:
        await _cancel(job_id, store, runner, state, reader.visible_owner)
    await store.delete(job_id, tenant=reader.visible_owner)
    return JSONResponse({"id": new_response_id(job_id), "object": "response", "deleted": True})


@router.post(
    "/responses/{response_id}/cancel",
    response_model=ResponseObject,
    responses={**STORED_DOCS, 409: {"model": OpenAIError, "description": "It ended while being cancelled"}},
    summary="Cancel a background response; one that already ended is returned as it is",
)
async def cancel_response(
    response_id: str, store: StoreDep, runner: RunnerDep, state: StateDep, reader: ReaderDep
) -> JSONResponse:
    job_id = job_id_of(response_id)
    job = await store.get(job_id, tenant=reader.visible_owner)
    response = stored_response(job)
    if not response.get("background"):
        raise InvalidRequestError("Only background responses can be cancelled.")
    if job.state in TERMINAL_STATES:
        return JSONResponse(response)
    return JSONResponse(stored_response(await _cancel(job_id, store, runner, state, reader.visible_owner)))


async def _cancel(job_id: str, store: JobStore, runner: JobRunner, state: AppState, tenant: str | None) -> Job:
    """Cancel a queued or running response job as ``/jobs/{id}/cancel`` does (refund, stop its work)."""
    try:
        job = await store.cancel(job_id, tenant=tenant)
    except TextGenError:
        job = await store.get(job_id, tenant=tenant)
        if job.state not in TERMINAL_STATES:
            raise
        return job  # it ended meanwhile
    if job.started_at is None:  # it never ran: its submitter gets the whole reservation back
        await state.service.refund_unused(job.reservation, None)
    runner.cancel_local(job_id)
    runner.notify()
    return job
