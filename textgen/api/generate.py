"""Generation routes: validate, check the prompt, submit to the engine (or the job store), await."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request, Response
from sse_starlette import ServerSentEvent

from textgen.api.deps import CallerDep, OwnerDep, RequestIdDep, RunnerDep, StateDep, StoreDep
from textgen.api.errors import error_responses
from textgen.api.schemas.native import BackgroundRequest, JobAccepted, TextGenerationRequest, TextGenerationResponse
from textgen.api.sse import SSE_RESPONSE_DOC, error_event, event, sse_response
from textgen.engine.types import GenerationResult, Handle, Priority
from textgen.errors import GenerationCancelledError
from textgen.generation import GenerationService, TextResult
from textgen.jobs.store import IDEMPOTENCY_KEY_MAX_LEN
from textgen.services.native import text_request
from textgen.webhooks import check_webhook

router = APIRouter(tags=["generation"])
MIN_TIME_LEFT_S = 0.001  # a deadline spent waiting for the model: the engine answers 504 at once
# Printable ASCII, as the job store checks; no space at either end, since HTTP strips it from header values.
IDEMPOTENCY_KEY_PATTERN = r"^[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?$"


def rendered(result: TextResult) -> TextGenerationResponse:
    """The response body of a finished generation (the domain's result, validated into the schema)."""
    return TextGenerationResponse.model_validate(result.to_dict())


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def results_unless_disconnected(request: Request, handles: Sequence[Handle]) -> list[GenerationResult]:
    """Await every result; if the client goes away first (or one fails), cancel the rest so their
    sequences leave the batch."""
    results = asyncio.ensure_future(asyncio.gather(*(h.result() for h in handles)))
    disconnect = asyncio.ensure_future(_wait_for_disconnect(request))
    waiting: set[asyncio.Future[Any]] = {results, disconnect}
    try:
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnect.cancel()
        if not results.done() or results.exception() is not None:
            for handle in handles:
                if not handle.done:
                    handle.cancel()
    if not results.done():
        results.cancel()
        with contextlib.suppress(asyncio.CancelledError, GenerationCancelledError):
            await results
        raise GenerationCancelledError("The client disconnected.")
    return results.result()


async def result_unless_disconnected(request: Request, handle: Handle) -> GenerationResult:
    """Await the result; if the client goes away first, cancel so the sequence leaves the batch."""
    return (await results_unless_disconnected(request, [handle]))[0]


async def generation_events(
    service: GenerationService, handle: Handle, request_id: str, caller: str
) -> AsyncIterator[ServerSentEvent]:
    """`token` events as text is produced, then `done` with the full response, or `error`.

    When the client disconnects, sse-starlette stops this generator and the handle is cancelled.
    """
    try:
        async for text in service.stream_text(handle):
            yield event("token", {"text": text})
        response = rendered(await service.response(await handle.result(), request_id, caller))
        yield event("done", response.model_dump(mode="json"))
    except Exception as error:
        yield error_event(error, request_id)


@router.post(
    "/generate",
    response_model=TextGenerationResponse,
    responses={**SSE_RESPONSE_DOC, **error_responses(400, 404, 422, 429, 503, 504, 500)},
    summary="Generate text and wait for it (or stream it with stream: true)",
)
async def generate(
    body: TextGenerationRequest,
    request: Request,
    state: StateDep,
    request_id: RequestIdDep,
    caller: CallerDep,
) -> TextGenerationResponse | Response:
    # 404 model_not_found before any work; a model not loaded yet loads now, waited for within the deadline,
    # and the time spent waiting counts against it.
    deadline_s, arrived = body.timeout_s or state.settings.request_timeout_s, time.monotonic()
    async with state.registry.use(body.model, deadline_s) as serving:
        service = serving.service
        await service.check_prompt(body.prompt, request_id)
        left_s = max(deadline_s - (time.monotonic() - arrived), MIN_TIME_LEFT_S)
        text = dataclasses.replace(text_request(body), timeout_s=left_s)
        service.check_logprobs_budget([text.params], "logprobs")
        await service.prepare_request(text)
        if body.stream:
            with state.streams.take(caller) as slot:  # before the budget is reserved: a refusal costs nothing
                handle = await service.submit_request_budgeted(caller, text, request_id, Priority.INTERACTIVE)
                return sse_response(slot.attach(generation_events(service, handle, request_id, caller)), request_id)
        handle = await service.submit_request_budgeted(caller, text, request_id, Priority.INTERACTIVE)
        result = await result_unless_disconnected(request, handle)
        return rendered(await service.response(result, request_id, caller))


@router.post(
    "/generate_background",
    status_code=202,
    response_model=JobAccepted,
    responses=error_responses(400, 404, 409, 422, 429, 503, 504, 500),
    summary="Queue a durable background job; poll the returned status URL",
)
async def generate_background(
    body: BackgroundRequest,
    response: Response,
    state: StateDep,
    store: StoreDep,
    runner: RunnerDep,
    request_id: RequestIdDep,
    caller: CallerDep,
    owner: OwnerDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            min_length=1,
            max_length=IDEMPOTENCY_KEY_MAX_LEN,
            pattern=IDEMPOTENCY_KEY_PATTERN,
            description="Same key and body within TEXTGEN_IDEMPOTENCY_TTL_S returns the same job; 409 on a new body. "
            f"1 to {IDEMPOTENCY_KEY_MAX_LEN} printable ASCII characters.",
        ),
    ] = None,
) -> JobAccepted:
    # The model is checked (404) and loaded now, as its tokenizer counts the prompt; the job runs on it later.
    async with state.registry.use(body.model, body.timeout_s or state.settings.request_timeout_s) as serving:
        service = serving.service
        await service.check_prompt(body.prompt, request_id)
        text = text_request(body)
        service.check_logprobs_budget([text.params], "logprobs")
        await service.prepare_request(text)
        prompt_tokens = await service.count_prompt_tokens([body.prompt])
    if body.callback_url is not None:
        await check_webhook(body.callback_url, state.settings)
    # Without a webhook or a model the stored request keeps its original shape (and Idempotency-Key fingerprints).
    left_out = {"stream"} | ({"callback_url"} if body.callback_url is None else set())
    left_out |= {"model"} if body.model is None else set()
    stored = body.model_dump(mode="json", exclude=left_out)
    # The submitter's token budget (prompt + output) is reserved now and refunded by whoever ends the job.
    # Without an output limit the job is granted what one window allows (the same for a replayed body).
    grant = await state.service.grant(caller, [text.params], prompt_tokens, open_ended=text.open_ended, flexible=False)
    if grant.max_new_tokens is not None:
        stored["max_new_tokens"] = grant.max_new_tokens
    reservation = grant.reservation
    encoded = reservation.encode() if reservation else None
    unused = reservation.tokens if reservation else 0
    try:
        if idempotency_key is None:
            job = await store.create(
                stored, request_id=request_id, callback_url=body.callback_url, tenant=owner, reservation=encoded
            )
        else:
            job, created = await store.create_idempotent(
                stored,
                request_id=request_id,
                key=idempotency_key,
                ttl_s=state.settings.idempotency_ttl_s,
                callback_url=body.callback_url,
                tenant=owner,
                reservation=encoded,
            )
            if not created:  # a replay: the original job holds its own reservation
                await state.service.rate_limiter.refund(reservation, unused)
    except BaseException:
        await state.service.rate_limiter.refund(reservation, unused)
        raise
    runner.notify()
    status_url = f"/jobs/{job.id}"
    response.headers["Location"] = status_url
    return JobAccepted(request_id=request_id, job_id=job.id, state=job.state, status_url=status_url)
