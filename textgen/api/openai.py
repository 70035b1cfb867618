"""OpenAI-compatible routes (/v1/models, /v1/completions, /v1/chat/completions).

Existing OpenAI clients work unchanged: the same request and response shapes, ``stream: true`` as
``data: {...}`` chunks ending with ``data: [DONE]``, ``usage``, ``n``, ``stop``, ``seed``. Errors use
OpenAI's ``{"error": {...}}`` body (plus the request id). The translation (messages to prompt, choices to
engine requests, results to responses and chunks) is the service layer's (``textgen.services.openai``);
these routes add HTTP: SSE, disconnects, error rendering.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from sse_starlette import ServerSentEvent
from starlette.exceptions import HTTPException as StarletteHTTPException

from textgen.api.deps import CallerDep, RequestIdDep, StateDep
from textgen.api.errors import (
    http_error_response,
    openai_error_response,
    textgen_error_response,
    validation_error_response,
)
from textgen.api.generate import results_unless_disconnected
from textgen.api.schemas.openai import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    OpenAIError,
)
from textgen.api.sse import SSE_RESPONSE_DOC, sse_response
from textgen.engine.types import GenerationResult, Handle, to_client_error
from textgen.errors import TextGenError
from textgen.generation import GenerationService
from textgen.services.model_registry import ModelEntry, ModelRegistry
from textgen.services.openai import (
    chat_chunks,
    chat_max_tokens,
    chat_response,
    checked_chat_prompt,
    checked_prompts,
    choice_sampling,
    completion_chunks,
    completion_response,
    grant_choices,
    prepare_chat,
    submit_choices,
)
from textgen.services.openai_types import openai_error_body

logger = logging.getLogger(__name__)


def openai_error(
    request: Request, status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return openai_error_response(request, status, message, param, headers=headers)


class OpenAIRoute(APIRoute):
    """Renders every error of these routes in OpenAI's shape (validation errors are 400, as OpenAI's),
    through the one error map (``textgen.api.errors``), before FastAPI's own handling sees them."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except StarletteHTTPException as error:
                return http_error_response(request, error)
            except RequestValidationError as error:
                return validation_error_response(request, error)
            except TextGenError as error:
                return textgen_error_response(request, error)

        return handle


router = APIRouter(prefix="/v1", tags=["openai"], route_class=OpenAIRoute)
ERROR_DOCS: dict[int | str, dict[str, Any]] = {
    code: {"model": OpenAIError, "description": description}
    for code, description in {
        400: "Invalid request, content rejected, or a body that is not valid JSON (param names the field)",
        401: "Missing or invalid API key",
        404: "Unknown model (code model_not_found, param model)",
        413: "Request body too large",
        429: "Rate limit exceeded; see Retry-After",
        500: "Internal error (no details exposed)",
        503: "Queue full or not ready",
        504: "Deadline passed",
    }.items()
}
GENERATION_DOCS = {**SSE_RESPONSE_DOC, **ERROR_DOCS}


async def _finished(
    request: Request, service: GenerationService, handles: Sequence[Handle], request_id: str, caller: str
) -> list[GenerationResult]:
    """Every choice's result (cancelling all if the client leaves), recorded and filtered."""
    return [await service.finish(r, request_id, caller) for r in await results_unless_disconnected(request, handles)]


def _data(payload: dict[str, Any]) -> ServerSentEvent:
    return ServerSentEvent(data=json.dumps(payload, ensure_ascii=True))  # see textgen.api.sse.event


async def _openai_stream(chunks: AsyncIterator[dict[str, Any]], request_id: str) -> AsyncIterator[ServerSentEvent]:
    try:
        async for chunk in chunks:
            yield _data(chunk)
    except Exception as error:
        client_error = to_client_error(error)
        if client_error is not error:
            logger.error("Stream failed", exc_info=error, extra={"request_id": request_id})
        assert isinstance(client_error, TextGenError)
        error = client_error
        yield _data(openai_error_body(error.status_code, error.message, request_id, error.shown_param, error.code))
    yield ServerSentEvent(data="[DONE]")


def _card(registry: ModelRegistry, entry: ModelEntry, model_id: str) -> ModelCard:
    """OpenAI's model object, plus where the model stands: loaded or not, its memory, its default status.
    An alias's card names the model it stands for in ``root``."""
    return ModelCard.model_validate(
        {"id": model_id, "created": registry.created, "root": entry.name, **entry.describe()}
    )


@router.get(
    "/models",
    response_model=ModelList,
    responses={code: ERROR_DOCS[code] for code in (401, 413, 429, 500)},
    summary="Every configured model and its aliases, with its state (loaded or not, memory)",
)
async def list_models(state: StateDep) -> ModelList:
    registry = state.registry
    cards = [
        _card(registry, entry, model_id) for entry in registry.entries.values() for model_id in registry.names(entry)
    ]
    return ModelList(data=cards)


@router.get(
    "/models/{model_id:path}",
    response_model=ModelCard,
    responses={code: ERROR_DOCS[code] for code in (401, 404, 413, 429, 500)},
    summary="One model card (a model or one of its aliases); else 404 model_not_found",
)
async def retrieve_model(state: StateDep, model_id: str) -> ModelCard:
    entry = state.registry.resolve(model_id)  # 404 model_not_found for any other name
    return _card(state.registry, entry, model_id)


@router.post(
    "/completions",
    response_model=CompletionResponse,
    responses=GENERATION_DOCS,
    summary="OpenAI-compatible text completion",
)
async def completions(
    body: CompletionRequest,
    request: Request,
    state: StateDep,
    request_id: RequestIdDep,
    caller: CallerDep,
) -> CompletionResponse | Response:
    # 404 model_not_found before any work; a model not loaded yet loads now (the wait counts against the deadline)
    async with state.registry.use(body.model, state.settings.request_timeout_s) as serving:
        service = serving.service
        prompts = await checked_prompts(service, body, request_id)
        await service.prepare(choice_sampling(body, body.max_tokens, 0))  # compile a constraint before queueing
        completion_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            with state.streams.take(caller) as slot:
                grant, max_tokens = await grant_choices(service, caller, prompts, body, body.max_tokens)
                handles = await service.submit_granted(
                    grant, lambda: submit_choices(service, prompts, body, max_tokens, request_id, tenant=caller)
                )
                chunks = completion_chunks(service, handles, body, completion_id, created, request_id, caller)
                return sse_response(slot.attach(_openai_stream(chunks, request_id)), request_id)
        grant, max_tokens = await grant_choices(service, caller, prompts, body, body.max_tokens)
        handles = await service.submit_granted(
            grant, lambda: submit_choices(service, prompts, body, max_tokens, request_id, tenant=caller)
        )
        results = await _finished(request, service, handles, request_id, caller)
        return completion_response(service, body, results, completion_id, created)


@router.post(
    "/chat/completions",
    response_model=ChatCompletionResponse,
    responses=GENERATION_DOCS,
    summary="OpenAI-compatible chat completion (the model's chat template)",
)
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    state: StateDep,
    request_id: RequestIdDep,
    caller: CallerDep,
) -> ChatCompletionResponse | Response:
    async with state.registry.use(body.model, state.settings.request_timeout_s) as serving:
        service = serving.service
        prompt = await checked_chat_prompt(service, serving.model.tokenizer, body, request_id)
        await prepare_chat(service, body)  # compile a constraint (tool calls, response_format) first
        chat_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            with state.streams.take(caller) as slot:
                grant, max_tokens = await grant_choices(service, caller, [prompt], body, chat_max_tokens(service, body))
                handles = await service.submit_granted(
                    grant, lambda: submit_choices(service, [prompt], body, max_tokens, request_id, tenant=caller)
                )
                chunks = chat_chunks(service, handles, body, chat_id, created, request_id, caller)
                return sse_response(slot.attach(_openai_stream(chunks, request_id)), request_id)
        grant, max_tokens = await grant_choices(service, caller, [prompt], body, chat_max_tokens(service, body))
        handles = await service.submit_granted(
            grant, lambda: submit_choices(service, [prompt], body, max_tokens, request_id, tenant=caller)
        )
        results = await _finished(request, service, handles, request_id, caller)
        return chat_response(service, body, results, chat_id, created)
