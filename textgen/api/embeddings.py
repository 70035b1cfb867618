"""``POST /v1/embeddings`` (OpenAI's shape) and vLLM's ``POST /tokenize`` / ``POST /detokenize`` (outside
``/v1``: the service's own error shape, as ``/generate``).

The translation lives in the service layer (``textgen.services.embeddings``, ``textgen.services.tokenize``);
these routes add HTTP: OpenAI's error body (``OpenAIRoute``), and cancelling the engine work when the client
goes away before its vectors are ready.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from textgen.api.deps import CallerDep, RequestIdDep, ServiceDep, StateDep
from textgen.api.openai import ERROR_DOCS, OpenAIRoute
from textgen.engine.types import EmbeddingHandle, EmbeddingResult
from textgen.errors import GenerationCancelledError
from textgen.services.embeddings import (
    EmbeddingCreateRequest,
    EmbeddingResponse,
    checked_inputs,
    embedding_response,
    submit_embedding,
)
from textgen.services.tokenize import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    detokenize,
    tokenize,
)

router = APIRouter(prefix="/v1", tags=["openai"], route_class=OpenAIRoute)
# Outside /v1 (vLLM's paths), but of the OpenAI route family: every error in OpenAI's shape, schema errors
# 400 naming the field, as vLLM answers them (``textgen.api.errors.is_openai_path`` covers the errors the
# middleware gives before routing: 401, 413, 429).
tokenizer_router = APIRouter(tags=["tokenizer"], route_class=OpenAIRoute)
TOKENIZER_ERRORS = ERROR_DOCS


async def wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def result_unless_disconnected(request: Request, handle: EmbeddingHandle) -> EmbeddingResult:
    """Await the vectors; if the client goes away first, cancel so the inputs not yet run are skipped."""
    result = asyncio.ensure_future(handle.result())
    disconnect = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        await asyncio.wait({result, disconnect}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnect.cancel()
        if not handle.done:
            handle.cancel()
    if not result.done():
        result.cancel()
        with contextlib.suppress(asyncio.CancelledError, GenerationCancelledError):
            await result
        raise GenerationCancelledError("The client disconnected.")
    return result.result()


@router.post(
    "/embeddings",
    response_model=EmbeddingResponse,
    responses=ERROR_DOCS,
    summary="OpenAI-compatible embeddings: the served model's mean-pooled, L2-normalised final hidden states",
)
async def create_embeddings(
    body: EmbeddingCreateRequest,
    request: Request,
    state: StateDep,
    request_id: RequestIdDep,
    caller: CallerDep,
) -> Response:
    # 404 model_not_found before any work; a model not loaded yet loads now
    async with state.registry.use(body.model, state.settings.request_timeout_s) as serving:
        service = serving.service
        inputs = await checked_inputs(service, serving.model, body, request_id)
        handle = await submit_embedding(service, caller, inputs, request_id)
        result = await result_unless_disconnected(request, handle)

    def render() -> Response:  # a few hundred thousand numbers: encoded off the event loop
        content: dict[str, Any] = embedding_response(service, result, body.encoding_format or "float")
        return JSONResponse(content, headers={"X-Request-ID": request_id})

    return await service.threads.run(render)


@tokenizer_router.post(
    "/tokenize",
    response_model=TokenizeResponse,
    responses=TOKENIZER_ERRORS,
    summary="vLLM-compatible: a prompt's or chat's token ids, as the engine counts them",
)
async def tokenize_route(body: TokenizeRequest, state: StateDep, _ready: ServiceDep) -> TokenizeResponse:
    async with state.registry.use(body.model, state.settings.request_timeout_s) as serving:
        return await tokenize(serving.service, serving.model, body)


@tokenizer_router.post(
    "/detokenize",
    response_model=DetokenizeResponse,
    responses=TOKENIZER_ERRORS,
    summary="vLLM-compatible: the text of token ids",
)
async def detokenize_route(body: DetokenizeRequest, state: StateDep, _ready: ServiceDep) -> DetokenizeResponse:
    async with state.registry.use(body.model, state.settings.request_timeout_s) as serving:
        return await detokenize(serving.service, serving.model, body)
