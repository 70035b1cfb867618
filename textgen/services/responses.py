"""OpenAI's Responses API on top of the chat path: a ``/v1/responses`` request becomes a chat completion
request (input items to chat messages, tools and ``text.format`` to the chat fields), runs through the
same functions as ``/v1/chat/completions`` (``textgen.services.openai``: chat template, content filter,
token budget, constraints), and its result becomes Responses output items (a ``message`` with
``output_text``, ``function_call`` items) or, streamed, the Responses event sequence.

Stored responses (``store``, the default, as OpenAI's) live in the durable job store as jobs of kind
``response``, under their caller's tenant and purged with the job TTL: an interactive response is stored
once it ended (``JobStore.create_finished``), a ``background`` one is queued and run by the job runner
(``response_executor``). A stored job's request keeps the response's skeleton (its fields without
output) and the conversation it answered (``items``: the input items, the previous responses' included),
so ``previous_response_id`` rebuilds the conversation as previous input + previous output + new input.
The HTTP side (status codes, SSE, disconnects) is ``textgen.api.responses``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from textgen.engine.types import GenerationResult, Handle, Priority
from textgen.errors import InvalidRequestError, JobNotFoundError, TextGenError
from textgen.generation import GenerationService
from textgen.jobs.store import Job, JobState, JobStore
from textgen.services.model_registry import ModelRegistry
from textgen.services.openai import chat_response, submit_chat
from textgen.services.requests import ChatCompletionRequest
from textgen.services.responses_types import ResponseRequest, check_fields
from textgen.services.tools import check_answer_format, tool_plan
from textgen.workers.runner import ExecutorFactory, JobExecutor, JobOutcome

RESPONSE_KIND = "response"
_ID_PATTERN = re.compile(r"resp_([0-9a-f]{32})")
_TEXT_PART_TYPES = {"input_text": "text", "output_text": "text", "text": "text", "refusal": "refusal"}
_MEDIA_PART_TYPES = {"input_image", "input_file", "input_audio", "image_url", "image", "file"}
_ROLES = {"user", "system", "developer", "assistant"}
_JOB_STATUS = {
    JobState.QUEUED: "queued",
    JobState.RUNNING: "in_progress",
    JobState.SUCCEEDED: "completed",
    JobState.FAILED: "failed",
    JobState.CANCELLED: "cancelled",
}


def new_response_id(job_id: str | None = None) -> str:
    return f"resp_{job_id or uuid.uuid4().hex}"


def job_id_of(response_id: str) -> str:
    """The job behind a response id; JobNotFoundError (404) for anything that is not one of ours."""
    match = _ID_PATTERN.fullmatch(response_id)
    if match is None:
        raise JobNotFoundError("No response with that id.")
    return match.group(1)


# ----- input items -> chat messages ------------------------------------------------------------------


def input_items(body: ResponseRequest) -> list[dict[str, Any]]:
    """The request's input as item dicts (a string is one user message)."""
    if isinstance(body.input, str):
        return [{"type": "message", "role": "user", "content": body.input}]
    return [item.model_dump(mode="json", exclude_none=True) for item in body.input]


def _text(value: Any, where: str) -> str:
    """A content string, or the text of a list of text parts (joined with newlines)."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise InvalidRequestError(f"{where}: must be a string or a list of content parts.", param=f"{where}")
    texts = []
    for j, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in _MEDIA_PART_TYPES:
            raise InvalidRequestError(
                f"{where}[{j}]: the served model takes text only ({kind} parts are refused).", param=f"{where}[{j}]"
            )
        key = _TEXT_PART_TYPES.get(str(kind))
        if key is None or not isinstance(part.get(key), str):
            raise InvalidRequestError(
                f"{where}[{j}]: a content part must be input_text / output_text with a 'text' string.",
                param=f"{where}[{j}]",
            )
        texts.append(part[key])
    return "\n".join(texts)


def _tool_call(item: dict[str, Any], where: str) -> dict[str, Any]:
    for key in ("call_id", "name", "arguments"):
        if not isinstance(item.get(key), str):
            raise InvalidRequestError(
                f"{where}.{key}: a function_call item needs a string {key}.", param=f"{where}.{key}"
            )
    function = {"name": item["name"], "arguments": item["arguments"]}
    return {"id": item["call_id"], "type": "function", "function": function}


def chat_messages(instructions: str | None, items: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation in the chat shape: instructions as the first system message, then each item;
    consecutive function_call items become one assistant message with ``tool_calls`` (joined to the
    assistant text just before them), function_call_output items ``tool`` messages."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": instructions}] if instructions else []
    for i, item in enumerate(items):
        where = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if not isinstance(role, str) or role not in _ROLES:
                raise InvalidRequestError(
                    f"{where}.role: must be one of user, system, developer, assistant.", param=f"{where}.role"
                )
            messages.append({"role": role, "content": _text(item.get("content"), f"{where}.content")})
        elif kind == "function_call":
            call = _tool_call(item, where)
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and "tool_call_id" not in last:
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise InvalidRequestError(
                    f"{where}.call_id: a function_call_output item needs a string call_id.", param=f"{where}.call_id"
                )
            content = _text(item.get("output"), f"{where}.output")
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": content})
        else:
            raise InvalidRequestError(
                f"{where}.type: {kind!r} items are not supported; send message, function_call or "
                "function_call_output items.",
                param=f"{where}.type",
            )
    if not messages:
        raise InvalidRequestError("input: the conversation has no messages.", param="input")
    return messages


# ----- tools and text.format -> chat fields ----------------------------------------------------------


def chat_tools(tools: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Responses' flat function tools in the chat shape; other tool types are refused by name."""
    converted = []
    for i, tool in enumerate(tools):
        if tool.get("type") != "function":
            raise InvalidRequestError(
                f"tools[{i}].type: {tool.get('type')!r} tools are not supported here; only function tools are.",
                param=f"tools[{i}].type",
            )
        if not isinstance(tool.get("name"), str):
            raise InvalidRequestError(f"tools[{i}].name: a function tool needs a name.", param=f"tools[{i}].name")
        function = {key: tool[key] for key in ("name", "description", "parameters", "strict") if key in tool}
        converted.append({"type": "function", "function": function})
    return converted


def chat_tool_choice(choice: str | dict[str, Any]) -> str | dict[str, Any]:
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise InvalidRequestError(
                "tool_choice: use none, auto, required or {'type': 'function', 'name': ...}.", param="tool_choice"
            )
        return choice
    if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
        raise InvalidRequestError(
            f"tool_choice: {choice.get('type')!r} is not supported; use {{'type': 'function', 'name': ...}}.",
            param="tool_choice",
        )
    return {"type": "function", "function": {"name": choice["name"]}}


def _dumped(value: Any) -> Any:
    """A request field as JSON data (its models dumped with their JSON names)."""
    if isinstance(value, list):
        return [_dumped(item) for item in value]
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json", by_alias=True, exclude_none=True)
    return value


def response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    """``text.format`` as the chat ``response_format``; other ``text`` settings are refused."""
    text = text or {}
    for key in text:
        if key not in ("format", "verbosity") or (key == "verbosity" and text[key] not in (None, "medium")):
            raise InvalidRequestError(f"text.{key}: not supported; only text.format is.", param=f"text.{key}")
    fmt = text.get("format") or {"type": "text"}
    if not isinstance(fmt, dict):
        raise InvalidRequestError("text.format: must be an object with a type.", param="text.format")
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise InvalidRequestError(
                "text.format.schema: a json_schema format needs the JSON schema object.", param="text.format.schema"
            )
        spec = {"name": fmt.get("name", "response"), "schema": fmt["schema"], "strict": fmt.get("strict")}
        return {"type": "json_schema", "json_schema": spec}
    raise InvalidRequestError(
        f"text.format.type: unknown type {kind!r}; use text, json_object or json_schema.", param="text.format.type"
    )


def chat_request(body: ResponseRequest, items: Sequence[dict[str, Any]], *, stream: bool) -> ChatCompletionRequest:
    """The chat completion request a Responses request runs as."""
    chat: dict[str, Any] = {
        "messages": chat_messages(body.instructions, items),
        "max_completion_tokens": body.max_output_tokens,
        "response_format": response_format(_dumped(body.text)),
        "stream": stream,
        "stream_options": {"include_usage": True} if stream else None,
    }
    if body.model is not None:  # the model it runs on (a background response's job reads it)
        chat["model"] = body.model
    if body.temperature is not None:
        chat["temperature"] = body.temperature
    if body.top_p is not None:
        chat["top_p"] = body.top_p
    tool_choice = _dumped(body.tool_choice)
    if body.tools:
        chat["tools"] = chat_tools(_dumped(body.tools))
        if tool_choice is not None:
            chat["tool_choice"] = chat_tool_choice(tool_choice)
        if body.parallel_tool_calls is not None:
            chat["parallel_tool_calls"] = body.parallel_tool_calls
    elif tool_choice not in (None, "none", "auto"):
        raise InvalidRequestError("tool_choice: required or a named function needs tools.", param="tool_choice")
    try:
        request = ChatCompletionRequest.model_validate(chat)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        param = "input" if where.startswith("messages") else where  # the messages are the input's items
        raise InvalidRequestError(f"{param}: as a chat request, {where}: {first['msg']}", param=param) from None
    check_answer_format(tool_plan(request), (request.response_format or {}).get("type"), "text.format")
    return request


# ----- the response object ---------------------------------------------------------------------------


def response_skeleton(body: ResponseRequest, response_id: str, created_at: float, status: str) -> dict[str, Any]:
    """Every field of the response object except its outcome (output, usage, error)."""
    return {
        "id": response_id,
        "object": "response",
        "created_at": int(created_at),
        "status": status,
        "background": bool(body.background),
        "error": None,
        "incomplete_details": None,
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "max_tool_calls": None,
        "metadata": body.metadata or {},
        "model": "",  # set by the caller (the served model's name)
        "output": [],
        "parallel_tool_calls": body.parallel_tool_calls is not False,
        "previous_response_id": body.previous_response_id,
        "reasoning": {"effort": None, "summary": None},
        "service_tier": "default",
        "store": body.stores,
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "text": {"format": _dumped(body.text.format if body.text and body.text.format else None) or {"type": "text"}},
        "tool_choice": "auto" if body.tool_choice is None else _dumped(body.tool_choice),
        "tools": _dumped(body.tools or []),
        "top_p": 1.0 if body.top_p is None else body.top_p,
        "truncation": "disabled",
        "usage": None,
        "user": body.user,
    }


def message_item(text: str, status: str, item_id: str | None = None) -> dict[str, Any]:
    return {
        "type": "message",
        "id": item_id or f"msg_{uuid.uuid4().hex}",
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
    }


def function_call_item(call: dict[str, Any], status: str, item_id: str | None = None) -> dict[str, Any]:
    function = call.get("function") or {}
    return {
        "type": "function_call",
        "id": item_id or f"fc_{uuid.uuid4().hex}",
        "call_id": call.get("id") or f"call_{uuid.uuid4().hex}",
        "name": function.get("name", ""),
        "arguments": function.get("arguments", ""),
        "status": status,
    }


def response_usage(usage: dict[str, Any] | None) -> dict[str, Any] | None:
    if usage is None:
        return None
    return {
        "input_tokens": usage["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": usage["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage["total_tokens"],
    }


# Chat finish reasons that leave a response incomplete, and the reason the Responses API names for each.
INCOMPLETE_REASONS = {"length": "max_output_tokens", "content_filter": "content_filter"}


def _finished(skeleton: dict[str, Any], output: list[dict[str, Any]], finish: str | None, usage: Any) -> dict[str, Any]:
    reason = INCOMPLETE_REASONS.get(finish or "")
    incomplete = reason is not None
    return {
        **skeleton,
        "status": "incomplete" if incomplete else "completed",
        "incomplete_details": {"reason": reason} if incomplete else None,
        "output": output,
        "usage": response_usage(usage),
        "completed_at": None if incomplete else int(time.time()),
    }


def completed_response(skeleton: dict[str, Any], chat: dict[str, Any]) -> dict[str, Any]:
    """The finished response object from a chat completion (its JSON form)."""
    choice = chat["choices"][0]
    message, finish = choice["message"], choice.get("finish_reason")
    calls = message.get("tool_calls") or []
    # Only complete calls are returned (one cut short is left out), so the text before them was not cut.
    status = "incomplete" if finish in INCOMPLETE_REASONS and not calls else "completed"
    output = []
    if message.get("content") or not calls:
        output.append(message_item(message.get("content") or "", status))
    output.extend(function_call_item(call, "completed") for call in calls)
    return _finished(skeleton, output, finish, chat.get("usage"))


def failed_response(skeleton: dict[str, Any], message: str) -> dict[str, Any]:
    return {**skeleton, "status": "failed", "error": {"code": "server_error", "message": message}}


def stored_response(job: Job) -> dict[str, Any]:
    """A stored response as it stands: its result once it ended, else its skeleton in the job's state."""
    if job.request.get("kind") != RESPONSE_KIND:
        raise JobNotFoundError("No response with that id.")
    if job.result is not None:
        return {**job.result, "id": new_response_id(job.id)}
    skeleton = {**job.request["response"], "id": new_response_id(job.id)}
    status = _JOB_STATUS[job.state]
    if job.state is JobState.FAILED:
        return failed_response(skeleton, job.error or "The response failed.")
    return {**skeleton, "status": status}


def _listed_item(item: dict[str, Any], item_id: str) -> dict[str, Any]:
    """A conversation item as ``input_items`` lists it: with an id and a status, content as parts."""
    kind = item.get("type", "message")
    listed = {"status": "completed", **item, "type": kind, "id": item.get("id") or item_id}
    if kind == "message" and isinstance(item.get("content"), str):
        part = "output_text" if item.get("role") == "assistant" else "input_text"
        extra: dict[str, Any] = {"annotations": []} if part == "output_text" else {}
        listed["content"] = [{"type": part, "text": item["content"], **extra}]
    return listed


def input_items_page(job: Job, *, limit: int, order: str, after: str | None) -> dict[str, Any]:
    """``GET /v1/responses/{id}/input_items``: the conversation the response answered (the previous
    responses' items included), a page of ``limit`` after the item ``after``, in ``order`` (asc / desc)."""
    stored_response(job)  # a 404 for jobs that are not responses
    prefixes = {"message": "msg", "function_call": "fc", "function_call_output": "fco"}
    items = [
        _listed_item(item, f"{prefixes.get(item.get('type', 'message'), 'item')}_{job.id}{index:04d}")
        for index, item in enumerate(job.request["items"])
    ]
    if order == "desc":
        items.reverse()
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise InvalidRequestError(f"after: no item {after!r} in this response's input.", param="after")
        items = items[ids.index(after) + 1 :]
    page = items[:limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(items) > limit,
    }


# ----- running it ------------------------------------------------------------------------------------


@dataclass
class PreparedResponse:
    """A validated Responses request ready to run: its chat form, conversation and response skeleton."""

    body: ResponseRequest
    chat: ChatCompletionRequest
    items: list[dict[str, Any]]  # the whole conversation: previous responses' input and output, then this input
    skeleton: dict[str, Any]
    job_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def stored_request(self, *, to_run: bool = False, max_new_tokens: int | None = None) -> dict[str, Any]:
        """The job's request: what GET shows before it ends and what chaining reads; ``to_run`` (a
        background response) adds the chat request the runner runs, with the output limit it was granted."""
        request: dict[str, Any] = {"kind": RESPONSE_KIND, "response": self.skeleton, "items": self.items}
        if to_run:
            request["chat"] = self.chat.model_dump(mode="json", exclude_unset=True)
        if max_new_tokens is not None:
            request["max_new_tokens"] = max_new_tokens
        return request


async def conversation(store: JobStore, body: ResponseRequest, tenant: str | None) -> list[dict[str, Any]]:
    """The input items this response answers: with ``previous_response_id``, that response's whole
    conversation and its output first (the caller's own responses only: another's is a 404)."""
    items = input_items(body)
    if body.previous_response_id is None:
        return items
    try:
        previous = await store.get(job_id_of(body.previous_response_id), tenant=tenant)
    except JobNotFoundError:
        raise JobNotFoundError(
            f"previous_response_id: no stored response {body.previous_response_id!r} (responses made with "
            "store: false are not kept; stored ones expire after TEXTGEN_JOB_TTL_S).",
            param="previous_response_id",
        ) from None
    if previous.request.get("kind") != RESPONSE_KIND:
        raise JobNotFoundError(
            f"previous_response_id: no stored response {body.previous_response_id!r}.", param="previous_response_id"
        )
    if previous.result is None:
        status = _JOB_STATUS[previous.state]
        raise InvalidRequestError(
            f"previous_response_id: response {body.previous_response_id} is {status}; continue from a completed one.",
            param="previous_response_id",
        )
    return [*previous.request["items"], *previous.result["output"], *items]


async def prepare_response(
    service: GenerationService, store: JobStore, body: ResponseRequest, tenant: str | None
) -> PreparedResponse:
    """Check every field, rebuild the conversation, translate it to a chat request."""
    check_fields(body)
    items = await conversation(store, body, tenant)
    chat = chat_request(body, items, stream=bool(body.stream))
    prepared = PreparedResponse(body, chat, items, {})
    status = "queued" if body.background else "in_progress"
    prepared.skeleton = response_skeleton(body, new_response_id(prepared.job_id), time.time(), status)
    prepared.skeleton["model"] = service.model_name
    return prepared


def chat_json(
    service: GenerationService,
    chat: ChatCompletionRequest,
    results: Sequence[GenerationResult],
    chat_id: str | None = None,
    created: int | None = None,
) -> dict[str, Any]:
    return chat_response(service, chat, results, chat_id, created).model_dump(mode="json")


async def store_finished(
    store: JobStore, prepared: PreparedResponse, response: dict[str, Any], request_id: str, tenant: str
) -> None:
    """Keep an interactive response that ended (with ``store``) under the id it was given."""
    await store.create_finished(
        prepared.stored_request(), request_id=request_id, result=response, tenant=tenant, job_id=prepared.job_id
    )


# ----- background responses: a job the runner runs -----------------------------------------------------


async def _gather(handles: Sequence[Handle]) -> list[GenerationResult]:
    try:
        return list(await asyncio.gather(*(handle.result() for handle in handles)))
    except BaseException:
        for handle in handles:
            handle.cancel()
        raise


def response_executor(service: GenerationService, models: ModelRegistry) -> JobExecutor:
    """The runner's executor for ``response`` jobs (``background: true``): the chat path at background
    priority, on the model the request named, within the reservation made when the job was created; the
    job's result is the response."""

    async def execute(job: Job, request_id: str, track: Callable[[Handle], None]) -> JobOutcome:
        chat_body = dict(job.request["chat"])
        granted = job.request.get("max_new_tokens")
        if isinstance(granted, int):
            chat_body.update(max_completion_tokens=granted, max_tokens=None)
        chat = ChatCompletionRequest.model_validate(chat_body)
        async with models.use(chat.model) as serving:
            chat_service, tokenizer = serving.service, serving.model.tokenizer
            handles = await submit_chat(
                chat_service, tokenizer, chat, request_id, Priority.BACKGROUND, tenant=job.tenant
            )
            for handle in handles:
                track(handle)
            results = [await chat_service.finish(result, request_id) for result in await _gather(handles)]
        skeleton = {**job.request["response"], "id": new_response_id(job.id), "status": "in_progress"}
        return JobState.SUCCEEDED, {"result": completed_response(skeleton, chat_json(chat_service, chat, results))}

    return execute


# The job kind the runner runs for background responses (registered by textgen.state.build_state).
RESPONSE_EXECUTORS: dict[str, ExecutorFactory] = {RESPONSE_KIND: response_executor}


# ----- streaming: chat chunks -> Responses events -----------------------------------------------------


class ResponseEvents:
    """Turns the chat path's stream chunks into the Responses event sequence, numbering every event."""

    def __init__(self, skeleton: dict[str, Any]) -> None:
        self.skeleton = skeleton
        self._sequence = itertools.count()
        self.output: list[dict[str, Any]] = []
        self._open: dict[str, Any] | None = None  # the item being streamed
        self._calls: dict[int, dict[str, Any]] = {}
        self.finish: str | None = None
        self.usage: dict[str, Any] | None = None

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        return {"type": kind, "sequence_number": next(self._sequence), **fields}

    def start(self) -> list[dict[str, Any]]:
        return [
            self.event("response.created", response=self.skeleton),
            self.event("response.in_progress", response=self.skeleton),
        ]

    def _open_item(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        events = self._close()
        self._open = item
        self.output.append(item)
        events.append(self.event("response.output_item.added", output_index=len(self.output) - 1, item=dict(item)))
        if item["type"] == "message":
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            events.append(
                self.event(
                    "response.content_part.added",
                    item_id=item["id"],
                    output_index=len(self.output) - 1,
                    content_index=0,
                    part=part,
                )
            )
        return events

    def _close(self) -> list[dict[str, Any]]:
        item, self._open = self._open, None
        if item is None:
            return []
        index = self.output.index(item)
        item["status"] = "incomplete" if self.finish in INCOMPLETE_REASONS else "completed"
        if item["type"] == "message":
            part = item["content"][0]
            where = {"item_id": item["id"], "output_index": index, "content_index": 0}
            return [
                self.event("response.output_text.done", **where, text=part["text"], logprobs=[]),
                self.event("response.content_part.done", **where, part=part),
                self.event("response.output_item.done", output_index=index, item=item),
            ]
        return [
            self.event(
                "response.function_call_arguments.done",
                item_id=item["id"],
                output_index=index,
                name=item["name"],
                arguments=item["arguments"],
            ),
            self.event("response.output_item.done", output_index=index, item=item),
        ]

    def chunk(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices", ()):
            delta = choice.get("delta") or {}
            if delta.get("content"):
                if self._open is None or self._open["type"] != "message":
                    events += self._open_item(message_item("", "in_progress"))
                assert self._open is not None
                self._open["content"][0]["text"] += delta["content"]
                where = {"item_id": self._open["id"], "output_index": len(self.output) - 1, "content_index": 0}
                events.append(self.event("response.output_text.delta", **where, delta=delta["content"], logprobs=[]))
            for call in delta.get("tool_calls") or ():
                events += self._call_delta(call)
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]
        return events

    def _call_delta(self, call: dict[str, Any]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        index = int(call.get("index", 0))
        item = self._calls.get(index)
        if item is None:
            item = function_call_item({**call, "function": {**(call.get("function") or {}), "arguments": ""}}, "")
            item["status"] = "in_progress"
            self._calls[index] = item
            events += self._open_item(item)
        fragment = (call.get("function") or {}).get("arguments") or ""
        if fragment:
            item["arguments"] += fragment
            events.append(
                self.event(
                    "response.function_call_arguments.delta",
                    item_id=item["id"],
                    output_index=self.output.index(item),
                    delta=fragment,
                )
            )
        return events

    def end(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The events closing the output, and the finished response (the last event is the caller's)."""
        events = []
        if not self.output:  # nothing generated: one empty message, as the non-streamed response has
            events += self._open_item(message_item("", "in_progress"))
        events += self._close()
        return events, _finished(self.skeleton, self.output, self.finish, self.usage)

    def final(self, response: dict[str, Any]) -> dict[str, Any]:
        kind = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
        return self.event(kind, response=response)

    def failed(self, error: TextGenError) -> list[dict[str, Any]]:
        return [
            self.event("error", code=None, message=error.message, param=None),
            self.event("response.failed", response=failed_response(self.skeleton, error.message)),
        ]


async def response_stream(
    chunks: AsyncIterator[dict[str, Any]],
    events: ResponseEvents,
    finish: Callable[[dict[str, Any]], Awaitable[None]],
) -> AsyncIterator[dict[str, Any]]:
    """The Responses events of a streamed chat; ``finish`` (storing it) runs before the final event."""
    for started in events.start():
        yield started
    async for chunk in chunks:
        for event in events.chunk(chunk):
            yield event
    closing, response = events.end()
    for event in closing:
        yield event
    await finish(response)
    yield events.final(response)


def sse_payload(event: dict[str, Any]) -> str:
    return json.dumps(event, ensure_ascii=True)
