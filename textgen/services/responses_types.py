"""What a ``POST /v1/responses`` body may hold (OpenAI's Responses API), validated: read by the route and,
for ``background: true``, by the job runner's executor (``textgen.services.responses``).

Every field OpenAI documents is either honoured, refused with a 400 naming it unless it asks for nothing
(null, or its default), or, where OpenAI itself documents it as metadata or a hint to its own
infrastructure, accepted and ignored (``IGNORED_FIELDS``; docs/api.md lists them). A field OpenAI does not
document is refused by name (``check_fields``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from textgen.errors import InvalidRequestError
from textgen.services.requests import json_number_only

# Accepted and ignored: metadata echoed back or hints about OpenAI's own caching and routing.
IGNORED_FIELDS = (
    "metadata",
    "user",
    "safety_identifier",
    "prompt_cache_key",
    "prompt_cache_retention",
    "prompt_cache_options",
    "service_tier",
)
# Refused unless they ask for nothing: (field, what asks for nothing, why it cannot be honoured).
REFUSED_FIELDS: tuple[tuple[str, tuple[Any, ...], str], ...] = (
    ("include", (None, []), "this server adds no extra output data (no logprobs, search results or reasoning)"),
    ("max_tool_calls", (None,), "limiting built-in tool calls is not supported; count function calls yourself"),
    ("reasoning", (None, {}), "the served model has no reasoning configuration"),
    ("conversation", (None,), "conversations are not stored here; chain responses with previous_response_id"),
    ("prompt", (None,), "stored prompt templates are not supported; send input and instructions"),
    ("context_management", (None, []), "server-side context compaction is not supported"),
    ("truncation", (None, "disabled"), "only 'disabled' is supported: a conversation too long is a 400"),
    ("top_logprobs", (None, 0), "log-probabilities are not returned by /v1/responses; use /v1/chat/completions"),
    ("image", (None,), "the served model takes text only"),
    ("moderation", (None,), "moderation settings are not supported (the server's own content filter applies)"),
    ("access_programs", (None,), "access programs are not supported"),
)
KNOWN_FIELDS = frozenset(
    {
        "model",
        "input",
        "instructions",
        "max_output_tokens",
        "temperature",
        "top_p",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "text",
        "store",
        "previous_response_id",
        "background",
        "stream",
        "stream_options",
        *IGNORED_FIELDS,
        *(name for name, _, _ in REFUSED_FIELDS),
    }
)
MAX_INPUT_ITEMS = 4096


class ResponseRequest(BaseModel):
    """A ``POST /v1/responses`` body. Unlisted fields are kept here and refused by ``check_fields``."""

    model_config = ConfigDict(extra="allow")

    model: str | None = Field(None, description="Ignored: this server serves one model.")
    input: Annotated[str, Field(min_length=1)] | Annotated[list[dict[str, Any]], Field(max_length=MAX_INPUT_ITEMS)] = (
        Field(
            ...,
            description="A user message as a string, or a list of items: messages (role + content as a string or "
            "input_text / output_text parts), function_call and function_call_output items.",
        )
    )
    instructions: str | None = Field(None, description="A system message put first (not carried over by chaining).")
    max_output_tokens: int | None = Field(None, ge=1, le=4096)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    tools: list[dict[str, Any]] | None = Field(
        None, max_length=128, description='Function tools: {"type": "function", "name", "parameters", "strict"}.'
    )
    tool_choice: str | dict[str, Any] | None = Field(
        None, description='"none", "auto", "required" or {"type": "function", "name": ...}.'
    )
    parallel_tool_calls: bool | None = Field(None, strict=True)
    text: dict[str, Any] | None = Field(
        None, description='{"format": {"type": "text" | "json_object" | "json_schema", ...}}.'
    )
    store: bool | None = Field(None, strict=True, description="Keep the response (default true) for GET and chaining.")
    previous_response_id: str | None = Field(None, max_length=64)
    background: bool | None = Field(None, strict=True, description="Run as a durable background job.")
    stream: bool | None = Field(None, strict=True)
    stream_options: dict[str, Any] | None = None
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | None = Field(
        None, max_length=16, description="Up to 16 pairs (keys up to 64, values up to 512 characters); echoed back."
    )
    user: str | None = Field(None, max_length=512)
    safety_identifier: str | None = Field(None, max_length=512)
    prompt_cache_key: str | None = Field(None, max_length=512)
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    prompt_cache_options: dict[str, Any] | None = None
    service_tier: str | None = Field(None, max_length=64)

    _numbers_only = field_validator("max_output_tokens", "temperature", "top_p", mode="before")(json_number_only)

    @property
    def stores(self) -> bool:
        return self.store is not False


def check_fields(body: ResponseRequest) -> None:
    """A 400 naming the first field this server cannot honour (see the module docstring)."""
    extra = body.model_extra or {}
    for name in extra:
        if name not in KNOWN_FIELDS:
            raise InvalidRequestError(
                f"{name}: unknown field; /v1/responses does not support it (see docs/api.md).", param=f"{name}"
            )
    for name, nothing, why in REFUSED_FIELDS:
        if name in extra and not any(extra[name] == value for value in nothing):
            raise InvalidRequestError(f"{name}: not supported: {why}.", param=f"{name}")
    options = body.stream_options or {}
    unknown_options = set(options) - {"include_obfuscation"}
    if unknown_options:
        raise InvalidRequestError(
            f"stream_options.{sorted(unknown_options)[0]}: unknown stream option.",
            param=f"stream_options.{sorted(unknown_options)[0]}",
        )
    if body.stream_options is not None and not body.stream:
        raise InvalidRequestError("stream_options: only allowed with stream: true.", param="stream_options")
    if body.background and not body.stores:
        raise InvalidRequestError(
            "background: a background response must be stored; drop store: false.", param="background"
        )
    if body.background and body.stream:
        raise InvalidRequestError(
            "stream: a background response is not streamed here; poll GET /v1/responses/{id} instead.",
            param="stream",
        )
