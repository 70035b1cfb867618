"""The OpenAI-compatible service: how a completion or chat request becomes engine work and how results
become OpenAI's responses and stream chunks.

Used by the ``/v1`` routes (``textgen.api.openai``, which adds HTTP: status codes, SSE, disconnects) and
by the batch-line executor (``textgen.services.batch_lines``): one translation for both. Messages become
a prompt through the model's chat template; each choice is one engine request; everything goes through
the same ``GenerationService`` as ``/generate`` (content filter, token budget, metrics).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any, Literal

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from textgen.engine.constraints import Constraint
from textgen.engine.types import (
    FinishReason,
    GenerationResult,
    Handle,
    LogprobEntry,
    Priority,
    PromptLogprob,
    SamplingParams,
)
from textgen.errors import InvalidRequestError, PromptTooLongError, TextGenError
from textgen.generation import GenerationService, StreamedLogprobs, TokenGrant
from textgen.services.messages import check_messages, message_texts, render_messages
from textgen.services.openai_types import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatTokenLogprob,
    ChatTopLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    FunctionCallOut,
    PromptTokensDetails,
    ToolCallOut,
    Usage,
    openai_error_body,
)
from textgen.services.requests import ChatCompletionRequest, ChatMessage, CompletionRequest
from textgen.services.tools import (
    NO_TOOLS,
    ArgumentsDelta,
    CallStart,
    ContentDelta,
    ParseEvent,
    ToolCallParser,
    ToolPlan,
    check_answer_format,
    parameters_schema,
    parse_tool_calls,
    tool_call_constraint,
    tool_plan,
)

OPENAI_FINISH: dict[FinishReason, Literal["stop", "length", "content_filter"]] = {
    FinishReason.LENGTH: "length",
    FinishReason.STOP: "stop",
    FinishReason.EOS: "stop",
    FinishReason.CONTENT_FILTER: "content_filter",
}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's ``{"error": {...}}`` for a status (also the body of a failed batch line)."""
    return {"error": openai_error_body(status, message, "", param, code)["error"]}


def render_chat_prompt(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[ChatMessage],
    plan: ToolPlan = NO_TOOLS,
    *,
    add_generation_prompt: bool = True,
) -> str:
    """The model's own chat template (tools through it, or the fallback of ``textgen.services.messages``);
    a plain 'role: content' transcript for models without one. ``add_generation_prompt``: end with the cue
    for the assistant's turn (what a chat completion sends)."""
    check_messages(messages)
    return render_messages(tokenizer, messages, plan, add_generation_prompt=add_generation_prompt)


def _response_format_schema(response_format: dict[str, Any] | None) -> dict[str, Any] | None:
    """The JSON schema ``response_format`` asks the answer to follow; None for text."""
    kind = (response_format or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = (response_format or {}).get("json_schema")
        schema = spec.get("schema", spec if "type" in spec else None) if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise InvalidRequestError(
                'response_format: json_schema needs an object {"name": ..., "schema": {...}} with the JSON schema.'
            )
        return schema
    raise InvalidRequestError(f"response_format: unknown type {kind!r}; use text, json_object or json_schema.")


def response_format_constraint(response_format: dict[str, Any] | None) -> Constraint | None:
    """OpenAI's ``response_format``: text (no constraint), json_object, or json_schema."""
    schema = _response_format_schema(response_format)
    if schema is None:
        return None
    if (response_format or {}).get("type") == "json_object":
        return Constraint.json_object()
    return Constraint.json_schema(schema)


def request_constraint(body: CompletionRequest | ChatCompletionRequest) -> Constraint | None:
    """The request's output constraint: its tool calls (``textgen.services.tools``: with tools offered,
    ``response_format`` shapes only a text answer: a 400 naming it where no text answer is allowed), else
    its ``response_format``."""
    if isinstance(body, ChatCompletionRequest):
        plan = tool_plan(body)
        check_answer_format(plan, (body.response_format or {}).get("type"))
        if plan.active:
            return tool_call_constraint(plan, _response_format_schema(body.response_format))
    return response_format_constraint(body.response_format)


def _logprobs_asked(body: CompletionRequest | ChatCompletionRequest) -> int | None:
    """Alternatives per token, or None when log-probabilities were not asked for."""
    if isinstance(body, CompletionRequest):
        return body.logprobs
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidRequestError("top_logprobs: set logprobs to true to use top_logprobs.")
    return (body.top_logprobs or 0) if body.logprobs else None


def _prompt_logprobs_asked(body: CompletionRequest | ChatCompletionRequest, choice: int) -> int | None:
    """echo with logprobs: the prompt's log-probabilities, computed for each prompt's first choice only
    (its other choices share the same prompt, so they reuse them)."""
    if isinstance(body, CompletionRequest) and body.echo and body.logprobs is not None and choice == 0:
        return body.logprobs
    return None


def choice_sampling(
    body: CompletionRequest | ChatCompletionRequest, max_tokens: int | None, choice: int
) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=max(0, body.top_k),
        repetition_penalty=body.repetition_penalty,
        seed=None if body.seed is None else body.seed + choice,
        stop=body.stop_strings(),
        ignore_eos=body.ignore_eos,
        constraint=request_constraint(body),
        logprobs=_logprobs_asked(body),
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        logit_bias=tuple(sorted((body.logit_bias or {}).items())),
        min_p=body.min_p,
        min_tokens=body.min_tokens,
        prompt_logprobs=_prompt_logprobs_asked(body, choice),
    )


def completion_logprobs(
    entries: Sequence[LogprobEntry], offset: int = 0, prompt: Sequence[PromptLogprob] = ()
) -> CompletionLogprobs:
    """The legacy completions shape; text_offset counts characters from the start of the output. With
    ``prompt`` (echo), the prompt's tokens come first, the first of them with null log-probabilities."""
    offsets = []
    for token in [*(e.token for e in prompt), *(e.token for e in entries)]:
        offsets.append(offset)
        offset += len(token)
    return CompletionLogprobs(
        tokens=[e.token for e in prompt] + [e.token for e in entries],
        token_logprobs=[e.logprob for e in prompt] + [e.logprob for e in entries],
        top_logprobs=[None if e.logprob is None else {t.token: t.logprob for t in e.top} for e in prompt]
        + [{t.token: t.logprob for t in e.top} for e in entries],
        text_offset=offsets,
    )


def chat_logprobs(entries: Sequence[LogprobEntry]) -> ChatLogprobs:
    def top(token: str, logprob: float) -> ChatTopLogprob:
        return ChatTopLogprob(token=token, logprob=logprob, bytes=list(token.encode("utf-8")))

    return ChatLogprobs(
        content=[
            ChatTokenLogprob(
                **top(e.token, e.logprob).model_dump(), top_logprobs=[top(t.token, t.logprob) for t in e.top]
            )
            for e in entries
        ]
    )


def names_no_output_limit(body: CompletionRequest | ChatCompletionRequest) -> bool:
    """No ``max_tokens`` (nor ``max_completion_tokens``): the default is an upper bound, not a request."""
    if isinstance(body, ChatCompletionRequest):
        return body.max_completion_tokens is None and body.max_tokens is None
    return body.max_tokens is None


def chat_max_tokens(service: GenerationService, body: ChatCompletionRequest) -> int:
    """A chat's output limit: what it asked for, else TEXTGEN_MAX_NEW_TOKENS_LIMIT (the model's context
    caps it further)."""
    return body.max_completion_tokens or body.max_tokens or service.settings.max_new_tokens_limit


def token_id_prompts(body: CompletionRequest | ChatCompletionRequest) -> list[tuple[int, ...]] | None:
    """A completion's prompts given as token ids (one list, or a list of lists); None for text prompts."""
    if isinstance(body, ChatCompletionRequest) or isinstance(body.prompt, str):
        return None
    items: list[Any] = list(body.prompt)
    if all(isinstance(item, int) for item in items):
        return [tuple(items)]
    if all(isinstance(item, list) for item in items):
        return [tuple(item) for item in items]
    return None


def decode_prompt(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> str:
    """A token-id prompt's text (for the content filter and echo); the engine itself uses the ids."""
    return str(tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False))


def prompts_of(tokenizer: PreTrainedTokenizerBase, body: CompletionRequest | ChatCompletionRequest) -> list[str]:
    """The prompts the engine sees: the completion's prompts (token ids decoded), or the chat rendered by
    its template."""
    if isinstance(body, ChatCompletionRequest):
        return [render_chat_prompt(tokenizer, body.messages, tool_plan(body))]
    ids = token_id_prompts(body)
    if ids is not None:
        return [decode_prompt(tokenizer, prompt) for prompt in ids]
    return [body.prompt] if isinstance(body.prompt, str) else [str(prompt) for prompt in body.prompt]


async def count_prompt_tokens(
    service: GenerationService, prompts: Sequence[str], body: CompletionRequest | ChatCompletionRequest
) -> int:
    """The request's prompt tokens as usage counts them: a token-id prompt's ids exactly, text counted by
    the tokenizer (0 where no token limit is charged, as ``GenerationService.count_prompt_tokens``)."""
    ids = token_id_prompts(body)
    if ids is None:
        return await service.count_prompt_tokens(prompts)
    return sum(len(prompt) for prompt in ids) if service.rate_limiter.tokens_per_minute else 0


def choice_params(
    prompts: Sequence[str], body: CompletionRequest | ChatCompletionRequest, max_tokens: int | None
) -> list[SamplingParams]:
    """One entry per choice the request generates (prompts x n): what its token budget covers."""
    return [choice_sampling(body, max_tokens, 0)] * (len(prompts) * body.n)


async def grant_choices(
    service: GenerationService,
    caller: str,
    prompts: Sequence[str],
    body: CompletionRequest | ChatCompletionRequest,
    max_tokens: int | None,
) -> tuple[TokenGrant, int | None]:
    """Reserve the request's prompt and output tokens; (the grant, the max_tokens to generate with)."""
    prompt_tokens = await count_prompt_tokens(service, prompts, body)
    params = choice_params(prompts, body, max_tokens)
    grant = await service.grant(caller, params, prompt_tokens, open_ended=names_no_output_limit(body))
    return grant, grant.max_new_tokens or max_tokens


def submit_choices(
    service: GenerationService,
    prompts: Sequence[str],
    body: CompletionRequest | ChatCompletionRequest,
    max_tokens: int | None,
    request_id: str,
    priority: Priority = Priority.INTERACTIVE,
    tenant: str | None = None,
) -> list[Handle]:
    """n handles per prompt, in OpenAI's choice order; cancels what was submitted if one is refused.
    ``tenant``: whose request (the prefix cache matches only that tenant's cached prompts)."""
    if len(body.stop_strings()) > 4:
        raise InvalidRequestError("stop: at most 4 stop sequences are allowed.")
    capacity = service.settings.max_running + service.settings.max_waiting
    if len(prompts) * body.n > capacity:
        raise InvalidRequestError(
            f"n: this request asks for {len(prompts) * body.n} completions; this server holds at most {capacity} "
            "at once (TEXTGEN_MAX_RUNNING + TEXTGEN_MAX_WAITING). Send fewer prompts or a smaller n."
        )
    ids: Sequence[tuple[int, ...] | None] = token_id_prompts(body) or [None] * len(prompts)
    handles: list[Handle] = []
    try:
        for prompt, prompt_ids in zip(prompts, ids, strict=True):
            for choice in range(body.n):
                params = choice_sampling(body, max_tokens, choice)
                handles.append(
                    service.submit(prompt, params, request_id, priority, prompt_ids=prompt_ids, tenant=tenant)
                )
    except TextGenError:
        for handle in handles:
            handle.cancel()
        raise
    return handles


def _usage(results: Sequence[GenerationResult], n: int) -> Usage:
    prompt_tokens = sum(result.prompt_tokens for result in results[::n])
    completion_tokens = sum(result.completion_tokens for result in results)
    cached_tokens = sum(result.cached_tokens for result in results[::n])
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
    )


ChoiceEvent = tuple[int, str, GenerationResult | None, list[LogprobEntry]]


async def _choice_events(
    service: GenerationService, handles: Sequence[Handle], request_id: str, caller: str
) -> AsyncIterator[ChoiceEvent]:
    """(choice index, text delta, final result or None, log-probabilities of the tokens generated since the
    choice's previous event) from all choices as they arrive."""
    queue: asyncio.Queue[tuple[int, str, GenerationResult | None, list[LogprobEntry], BaseException | None]] = (
        asyncio.Queue()
    )

    async def pump(index: int, handle: Handle) -> None:
        streaming_filter = service.streaming_filter(handle)
        logprobs = StreamedLogprobs(service, handle)  # paced by what the filter lets through
        try:
            async for text in service.stream_text(handle, streaming_filter=streaming_filter):
                queue.put_nowait((index, text, None, logprobs.take(streaming_filter), None))
            result = await service.finish(await handle.result(), request_id, caller)
            queue.put_nowait((index, "", result, logprobs.take(streaming_filter, final=True), None))
        except BaseException as error:
            queue.put_nowait((index, "", None, [], error))
            raise

    tasks = [asyncio.create_task(pump(index, handle)) for index, handle in enumerate(handles)]
    try:
        remaining = len(handles)
        while remaining:
            index, text, result, logprobs, error = await queue.get()
            if error is not None:
                raise error
            remaining -= result is not None
            yield index, text, result, logprobs
    finally:
        for task in tasks:
            task.cancel()
        for handle in handles:
            if not handle.done:
                handle.cancel()


def _usage_chunk(base: dict[str, Any], finals: dict[int, GenerationResult], n: int) -> dict[str, Any]:
    """The last streamed chunk with stream_options.include_usage: no choices, the request's usage."""
    ordered = [finals[i] for i in range(len(finals))]
    return {**base, "choices": [], "usage": _usage(ordered, n).model_dump()}


def _include_usage(body: CompletionRequest | ChatCompletionRequest) -> bool:
    return bool((body.stream_options or {}).get("include_usage"))


async def checked_prompts(service: GenerationService, body: CompletionRequest, request_id: str) -> list[str]:
    """The request's prompts, each checked (length, then content filter), and its log-probabilities
    bounded. Token-id prompts are checked against the prompt limit and the vocabulary, then decoded (the
    filter reads their text; the engine gets the ids)."""
    check_logit_bias(service, body)
    ids = token_id_prompts(body)
    if ids is not None:
        prompts = await decoded_prompts(service, ids)
    else:
        prompts = [body.prompt] if isinstance(body.prompt, str) else [str(prompt) for prompt in body.prompt]
    if not prompts or not all(prompts):
        raise InvalidRequestError("prompt: must be a non-empty string or a list of non-empty strings.")
    service.check_logprobs_budget([choice_sampling(body, body.max_tokens, 0)] * (len(prompts) * body.n), "logprobs")
    await service.check_prompts(prompts, request_id)
    if body.echo and body.logprobs is not None:
        await check_prompt_logprobs_budget(service, prompts, ids, body)
    return prompts


def check_logit_bias(service: GenerationService, body: CompletionRequest | ChatCompletionRequest) -> None:
    """400 naming logit_bias for a token id outside the vocabulary (the engine checks again)."""
    vocabulary = _vocabulary(service)
    if body.logit_bias and vocabulary and max(body.logit_bias) >= vocabulary:
        raise InvalidRequestError(
            f"logit_bias: token {max(body.logit_bias)} is not in this model's vocabulary (ids 0 to {vocabulary - 1})."
        )


def _vocabulary(service: GenerationService) -> int:
    return 0 if service.tokenizer is None else len(service.tokenizer)


async def decoded_prompts(service: GenerationService, ids: Sequence[Sequence[int]]) -> list[str]:
    """Token-id prompts checked (length, vocabulary) and decoded in a worker thread."""
    limit = service.prompt_token_limit
    vocabulary = _vocabulary(service)
    tokenizer = service.tokenizer
    if tokenizer is None:
        raise InvalidRequestError("prompt: this server cannot take prompts as token ids (it has no tokenizer).")
    for prompt in ids:
        if len(prompt) > limit:
            raise PromptTooLongError(
                f"The prompt has {len(prompt)} tokens; this server accepts at most {limit} "
                "(TEXTGEN_MAX_PROMPT_TOKENS and the model's context length). Shorten the prompt."
            )
        if max(prompt) >= vocabulary:
            raise InvalidRequestError(
                f"prompt: token {max(prompt)} is not in this model's vocabulary (ids 0 to {vocabulary - 1})."
            )
    return await service.threads.run(lambda: [decode_prompt(tokenizer, prompt) for prompt in ids])


async def check_prompt_logprobs_budget(
    service: GenerationService, prompts: Sequence[str], ids: Sequence[Sequence[int]] | None, body: CompletionRequest
) -> None:
    """echo with logprobs returns each prompt token's entry too: 400 naming logprobs when the prompts'
    entries (each with its alternatives) and the generated ones together pass
    TEXTGEN_MAX_LOGPROBS_PER_REQUEST."""
    tokenizer = service.tokenizer
    if ids is not None:
        prompt_tokens = sum(len(prompt) for prompt in ids)
    elif tokenizer is not None:
        prompt_tokens = await service.threads.run(
            lambda: sum(len(tokenizer(prompt, add_special_tokens=True).input_ids) for prompt in prompts)
        )
    else:
        return
    alternatives = body.logprobs or 0
    generated = service.token_budget(choice_sampling(body, body.max_tokens, 0)) * len(prompts) * body.n
    entries = (prompt_tokens + generated) * (1 + alternatives)
    limit = service.settings.max_logprobs_per_request
    if entries > limit:
        raise InvalidRequestError(
            f"logprobs: echo returns the prompts' {prompt_tokens} tokens' log-probabilities besides the "
            f"{generated} generated ones, × (1 + {alternatives} alternatives) = {entries}, more than this server "
            f"returns for one request ({limit}, TEXTGEN_MAX_LOGPROBS_PER_REQUEST); ask for fewer alternatives, "
            "fewer tokens or a shorter prompt."
        )


def echoed_prompts(service: GenerationService, body: CompletionRequest) -> list[str]:
    """echo: each prompt's text as the choice starts with it (token ids decoded)."""
    ids = token_id_prompts(body)
    if ids is not None and service.tokenizer is not None:
        return [decode_prompt(service.tokenizer, prompt) for prompt in ids]
    return [body.prompt] if isinstance(body.prompt, str) else [str(prompt) for prompt in body.prompt]


async def submit_completion(
    service: GenerationService, body: CompletionRequest, request_id: str, priority: Priority, tenant: str | None
) -> list[Handle]:
    """What the /v1/completions route does before it waits: check the prompts, submit every choice (batch lines)."""
    prompts = await checked_prompts(service, body, request_id)
    return submit_choices(service, prompts, body, body.max_tokens, request_id, priority, tenant=tenant)


def completion_response(
    service: GenerationService,
    body: CompletionRequest,
    results: Sequence[GenerationResult],
    completion_id: str | None = None,
    created: int | None = None,
) -> CompletionResponse:
    echoed = echoed_prompts(service, body) if body.echo else None
    choices = []
    for i, r in enumerate(results):
        prompt = _echoed_logprobs(body, results, i)
        logprobs = None
        if r.token_logprobs is not None:
            logprobs = completion_logprobs(r.token_logprobs, prompt=prompt)
        choices.append(
            CompletionChoice(
                index=i,
                text=r.text if echoed is None else echoed[i // body.n] + r.text,
                logprobs=logprobs,
                finish_reason=OPENAI_FINISH[r.finish_reason],
            )
        )
    return CompletionResponse(
        id=completion_id or f"cmpl-{uuid.uuid4().hex}",
        created=created or int(time.time()),
        model=service.model_name,
        choices=choices,
        usage=_usage(results, body.n),
    )


def _echoed_logprobs(body: CompletionRequest, results: Sequence[GenerationResult], choice: int) -> list[PromptLogprob]:
    """The prompt entries a choice's logprobs start with under echo (computed with the prompt's first choice)."""
    if not body.echo or body.logprobs is None:
        return []
    return list(results[choice - choice % body.n].prompt_logprobs or ())


async def completion_chunks(
    service: GenerationService,
    handles: Sequence[Handle],
    body: CompletionRequest,
    completion_id: str,
    created: int,
    request_id: str,
    caller: str,
) -> AsyncIterator[dict[str, Any]]:
    base = {"id": completion_id, "object": "text_completion", "created": created, "model": service.model_name}
    finals: dict[int, GenerationResult] = {}
    offsets = [0] * len(handles)
    echoed = echoed_prompts(service, body) if body.echo else None
    started: set[int] = set()
    async for index, text, result, entries in _choice_events(service, handles, request_id, caller):
        finish = None
        if result is not None:
            finals[index] = result
            finish = OPENAI_FINISH[result.finish_reason]
        prompt: list[PromptLogprob] = []
        if echoed is not None and index not in started:  # echo: the choice's first chunk starts with the prompt
            text = echoed[index // body.n] + text
            if body.logprobs is not None:
                prompt = list(handles[index - index % body.n].prompt_logprobs or ())
        started.add(index)
        logprobs = None
        if body.logprobs is not None:
            logprobs = completion_logprobs(entries, offsets[index], prompt).model_dump()
            offsets[index] += sum(len(e.token) for e in prompt) + sum(len(e.token) for e in entries)
        yield {**base, "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]}
    if _include_usage(body):
        yield _usage_chunk(base, finals, body.n)


async def checked_chat_prompt(
    service: GenerationService, tokenizer: PreTrainedTokenizerBase, body: ChatCompletionRequest, request_id: str
) -> str:
    """The rendered chat prompt, checked (length, then each message through the content filter), with the
    request's log-probabilities bounded; rendering and checks run off the event loop."""
    plan = tool_plan(body)
    check_messages(body.messages)
    service.check_logprobs_budget([choice_sampling(body, chat_max_tokens(service, body), 0)] * body.n, "top_logprobs")
    check_logit_bias(service, body)
    return await service.check_chat(
        message_texts(body.messages, plan),
        lambda: render_chat_prompt(tokenizer, body.messages, plan),
        request_id,
    )


async def prepare_chat(service: GenerationService, body: ChatCompletionRequest) -> None:
    """Compile the chat's constraint before anything is queued. When the tool-call grammar does not
    compile, each function's schema is compiled alone to name the one at fault
    (``tools.N.function.parameters``)."""
    try:
        await service.prepare(choice_sampling(body, chat_max_tokens(service, body), 0))
    except InvalidRequestError as error:
        plan = tool_plan(body)
        if not plan.active or error.param is not None:
            raise
        for index, function in enumerate(plan.functions):
            where = plan.parameters_field(index)
            try:
                await service.prepare_constraint(Constraint.json_schema(parameters_schema(function)))
            except InvalidRequestError as culprit:
                message = culprit.message.split(": ", 1)[-1]
                raise InvalidRequestError(f"{where}: {message}", param=where) from None
        raise InvalidRequestError(error.message, param="functions" if plan.legacy else "tools") from None


async def submit_chat(
    service: GenerationService,
    tokenizer: PreTrainedTokenizerBase,
    body: ChatCompletionRequest,
    request_id: str,
    priority: Priority,
    tenant: str | None,
) -> list[Handle]:
    """What the chat route does before it waits: check, render the chat prompt, submit every choice (batch lines).
    ``tenant``: whose request (the prefix cache matches only that tenant's cached prompts)."""
    prompt = await checked_chat_prompt(service, tokenizer, body, request_id)
    await prepare_chat(service, body)
    max_tokens = chat_max_tokens(service, body)
    return submit_choices(service, [prompt], body, max_tokens, request_id, priority, tenant=tenant)


def chat_response(
    service: GenerationService,
    body: ChatCompletionRequest,
    results: Sequence[GenerationResult],
    chat_id: str | None = None,
    created: int | None = None,
) -> ChatCompletionResponse:
    return ChatCompletionResponse(
        id=chat_id or f"chatcmpl-{uuid.uuid4().hex}",
        created=created or int(time.time()),
        model=service.model_name,
        choices=[
            ChatChoice(
                index=i,
                message=message,
                logprobs=None if r.token_logprobs is None else chat_logprobs(r.token_logprobs),
                finish_reason=finish,
            )
            for i, r in enumerate(results)
            for message, finish in [assistant_message(tool_plan(body), r)]
        ],
        usage=_usage(results, body.n),
    )


ChatFinish = Literal["stop", "length", "content_filter", "tool_calls", "function_call"]


def _call_finish(plan: ToolPlan, result: GenerationResult, called: bool) -> ChatFinish:
    """``tool_calls`` (legacy: ``function_call``) when the answer holds complete calls and was not cut short
    (by its token budget, or by the content filter: the calls completed before the match are still sent)."""
    finish = OPENAI_FINISH[result.finish_reason]
    if called and finish == "stop":
        return "function_call" if plan.legacy else "tool_calls"
    return finish


def assistant_message(plan: ToolPlan, result: GenerationResult) -> tuple[AssistantMessage, ChatFinish]:
    """The answer's message: text, or the calls parsed out of it (an unfinished call is left out)."""
    if not plan.active:
        return AssistantMessage(content=result.text), OPENAI_FINISH[result.finish_reason]
    parsed = parse_tool_calls(result.text)
    calls = parsed.complete_calls
    if not calls:
        return AssistantMessage(content=parsed.content), OPENAI_FINISH[result.finish_reason]
    content = parsed.content if parsed.content.strip() else None
    finish = _call_finish(plan, result, True)
    if plan.legacy:
        call = FunctionCallOut(name=calls[0].name, arguments=calls[0].arguments)
        return AssistantMessage(content=content, function_call=call), finish
    tool_calls = [ToolCallOut(id=c.id, function=FunctionCallOut(name=c.name, arguments=c.arguments)) for c in calls]
    return AssistantMessage(content=content, tool_calls=tool_calls), finish


def _stream_delta(plan: ToolPlan, event: ParseEvent) -> dict[str, Any]:
    """A parse event as OpenAI's streamed delta: a call's index, id, type and name first (arguments
    ""), then its argument fragments; legacy requests get ``function_call`` deltas."""
    if isinstance(event, ContentDelta):
        return {"content": event.text}
    if isinstance(event, CallStart):
        if plan.legacy:
            return {"function_call": {"name": event.name, "arguments": ""}}
        function = {"name": event.name, "arguments": ""}
        return {"tool_calls": [{"index": event.index, "id": event.id, "type": "function", "function": function}]}
    assert isinstance(event, ArgumentsDelta)
    if plan.legacy:
        return {"function_call": {"arguments": event.text}}
    return {"tool_calls": [{"index": event.index, "function": {"arguments": event.text}}]}


async def chat_chunks(
    service: GenerationService,
    handles: Sequence[Handle],
    body: ChatCompletionRequest,
    chat_id: str,
    created: int,
    request_id: str,
    caller: str,
) -> AsyncIterator[dict[str, Any]]:
    base = {"id": chat_id, "object": "chat.completion.chunk", "created": created, "model": service.model_name}
    for index in range(len(handles)):
        yield {
            **base,
            "choices": [{"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
        }
    finals: dict[int, GenerationResult] = {}
    plan = tool_plan(body)
    parsers = [ToolCallParser() for _ in handles] if plan.active else None
    async for index, text, result, entries in _choice_events(service, handles, request_id, caller):
        logprobs = chat_logprobs(entries).model_dump() if body.logprobs and entries else None
        if parsers is None:
            deltas = [{"content": text}] if text else []
        else:
            events = parsers[index].feed(text) + (parsers[index].finish() if result is not None else [])
            deltas = [_stream_delta(plan, event) for event in events]
        if logprobs and not deltas:
            deltas = [{"content": ""}]
        for number, delta in enumerate(deltas):
            choice = {"index": index, "delta": delta, "finish_reason": None}
            yield {**base, "choices": [{**choice, "logprobs": logprobs} if logprobs and number == 0 else choice]}
        if result is not None:
            finals[index] = result
            if parsers is None:
                finish: str = OPENAI_FINISH[result.finish_reason]
            else:
                finish = _call_finish(plan, result, bool(parsers[index].complete_calls))
            yield {**base, "choices": [{"index": index, "delta": {}, "finish_reason": finish}]}
    if _include_usage(body):
        yield _usage_chunk(base, finals, body.n)
