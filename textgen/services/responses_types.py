"""What a ``POST /v1/responses`` body may hold (OpenAI's Responses API), validated: read by the route and,
for ``background: true``, by the job runner's executor (``textgen.services.responses``).

Every field OpenAI documents is either honoured, refused with a 400 naming it unless it asks for nothing
(null, or its default), or, where OpenAI itself documents it as metadata or a hint to its own
infrastructure, accepted and ignored (``IGNORED_FIELDS``; docs/api.md lists them). A field OpenAI does not
document is refused by name (the model forbids extras). Items, parts and tools are typed, so the OpenAPI
document says what is served; ``check_fields`` refuses the combinations a schema cannot express.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    field_validator,
)
from pydantic_core import PydanticCustomError

from textgen.errors import InvalidRequestError
from textgen.services.requests import MAX_CONTENT_PARTS, MAX_MESSAGES, FunctionName, json_number_only

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
MAX_INPUT_ITEMS = MAX_MESSAGES  # the chat path's limits: each item is at most one chat message


def _refuse(why: str, *nothing: Any) -> BeforeValidator:
    """A field this server cannot honour: accepted only when it asks for nothing (null or one of
    ``nothing``), else a 400 naming it and saying why. The schema documents it as null."""

    def check(value: Any) -> None:
        if value is None or any(value == allowed for allowed in nothing):
            return None
        raise PydanticCustomError("unsupported", "not supported: {why}.", {"why": why})

    return BeforeValidator(check)


class _Lenient(BaseModel):
    """Items and parts ignore what they do not use (clients send output items back with ids, statuses)."""

    model_config = ConfigDict(extra="ignore")


class TextPart(_Lenient):
    type: Literal["input_text", "output_text", "text"]
    text: str


class RefusalPart(_Lenient):
    type: Literal["refusal"]
    refusal: str


class MediaPart(BaseModel):
    """Image, file and audio parts: described so that they are refused with a clear 400 (text only)."""

    model_config = ConfigDict(extra="allow")

    type: Literal["input_image", "input_file", "input_audio"]


ContentPart = Annotated[TextPart | RefusalPart | MediaPart, Field(discriminator="type")]
Content = str | Annotated[list[ContentPart], Field(max_length=MAX_CONTENT_PARTS)]


class MessageItem(_Lenient):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: Content


class FunctionCallItem(_Lenient):
    type: Literal["function_call"]
    call_id: str = Field(..., min_length=1, max_length=256)
    name: FunctionName
    arguments: str = Field(..., max_length=262_144, description="The arguments as a JSON object, as text.")
    id: str | None = Field(None, max_length=256)


class FunctionCallOutputItem(_Lenient):
    type: Literal["function_call_output"]
    call_id: str = Field(..., min_length=1, max_length=256)
    output: Content


def _item_type(value: Any) -> str:
    kind = value.get("type", "message") if isinstance(value, dict) else getattr(value, "type", "message")
    return kind if isinstance(kind, str) else ""


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")],
    Discriminator(_item_type),
]


class FunctionTool(_Lenient):
    """A function tool in the Responses flat shape."""

    type: Literal["function"]
    name: FunctionName
    description: str | None = Field(None, max_length=16_384)
    parameters: dict[str, Any] | None = Field(None, description="A JSON schema of the arguments object.")
    strict: bool | None = None


class FunctionChoice(BaseModel):
    type: Literal["function"]
    name: FunctionName


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, max_length=64)
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="The JSON schema (json_schema).")
    description: str | None = Field(None, max_length=16_384)
    strict: bool | None = None


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: TextFormat | None = None
    verbosity: Literal["medium"] | None = Field(None, description="Only medium (the model has no other).")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_obfuscation: bool | None = Field(None, description="Accepted: nothing is obfuscated here.")


class ResponseRequest(BaseModel):
    """A ``POST /v1/responses`` body. A field OpenAI does not document is a 400 naming it."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        None, description="The served name or an alias (GET /v1/models); left out = the served model; else 404."
    )
    input: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[InputItem], Field(min_length=1, max_length=MAX_INPUT_ITEMS)]
    ) = Field(
        ...,
        description="A user message as a string, or a list of items: messages (role + content as a string or "
        "input_text / output_text parts), function_call and function_call_output items.",
    )
    instructions: str | None = Field(None, description="A system message put first (not carried over by chaining).")
    max_output_tokens: int | None = Field(None, ge=1, le=4096)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    tools: Annotated[list[FunctionTool], Field(max_length=128)] | None = Field(
        None, description='Function tools: {"type": "function", "name", "parameters", "strict"}.'
    )
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = Field(
        None, description='"none", "auto", "required" or {"type": "function", "name": ...}.'
    )
    parallel_tool_calls: bool | None = Field(None, strict=True)
    text: TextConfig | None = Field(None, description='{"format": {"type": "text" | "json_object" | "json_schema"}}.')
    store: bool | None = Field(None, strict=True, description="Keep the response (default true) for GET and chaining.")
    previous_response_id: str | None = Field(None, max_length=64)
    background: bool | None = Field(None, strict=True, description="Run as a durable background job.")
    stream: bool | None = Field(None, strict=True)
    stream_options: StreamOptions | None = None
    # Metadata and hints: accepted and ignored (metadata and user are echoed back).
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | None = Field(
        None, max_length=16, description="Up to 16 pairs (keys up to 64, values up to 512 characters); echoed back."
    )
    user: str | None = Field(None, max_length=512)
    safety_identifier: str | None = Field(None, max_length=512)
    prompt_cache_key: str | None = Field(None, max_length=512)
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    prompt_cache_options: dict[str, Any] | None = None
    service_tier: str | None = Field(None, max_length=64)
    # Refused unless they ask for nothing.
    include: Annotated[None, _refuse("no extra output data is added (logprobs, search results, reasoning)", [])] = None
    max_tool_calls: Annotated[None, _refuse("limiting built-in tool calls is not supported")] = None
    reasoning: Annotated[None, _refuse("the served model has no reasoning settings", {})] = None
    conversation: Annotated[None, _refuse("conversations are not stored here; chain with previous_response_id")] = None
    prompt: Annotated[None, _refuse("stored prompt templates are not supported; send input and instructions")] = None
    context_management: Annotated[None, _refuse("server-side context compaction is not supported", [])] = None
    truncation: Annotated[
        None, _refuse("only 'disabled' is supported: a conversation too long is a 400", "disabled")
    ] = None
    top_logprobs: Annotated[None, _refuse("log-probabilities are not returned here; use /v1/chat/completions", 0)] = (
        None
    )
    image: Annotated[None, _refuse("the served model takes text only")] = None
    moderation: Annotated[None, _refuse("moderation settings are not supported (the server's filter applies)")] = None
    access_programs: Annotated[None, _refuse("access programs are not supported")] = None

    _numbers_only = field_validator("max_output_tokens", "temperature", "top_p", mode="before")(json_number_only)

    @field_validator("input", mode="before")
    @classmethod
    def _items_named_by_place(cls, value: Any) -> Any:
        """A list is validated as items here, so that an error names the item and field at fault
        (``input[2].role``) instead of every way the value is not a string either."""
        if isinstance(value, str):
            if not value:
                raise PydanticCustomError("empty_input", "must be a non-empty string or a non-empty list of items")
            return value
        if not isinstance(value, list):
            raise PydanticCustomError("input_type", "must be a string or a list of items")
        try:
            return _ITEMS.validate_python(value)
        except ValidationError as error:
            problems = error.errors()
            # Of a part's alternatives (a string, a list of parts), report the one the value was meant as.
            first = next((p for p in problems if not set(p["loc"]) & _BRANCH_NAMES), problems[0])
            if not first["loc"]:  # the list itself (empty, too long)
                raise PydanticCustomError("invalid_items", "{message}", {"message": first["msg"]}) from None
            where = _item_place(first["loc"], first["type"])
            raise PydanticCustomError(
                "invalid_item", "{where}: {message}", {"where": where, "message": first["msg"]}
            ) from None

    @property
    def stores(self) -> bool:
        return self.store is not False


_ITEMS: TypeAdapter[list[Any]] = TypeAdapter(
    Annotated[list[InputItem], Field(min_length=1, max_length=MAX_INPUT_ITEMS)]
)


# Parts of a pydantic location that name a union's branch rather than a place in the request.
_BRANCH_NAMES = {"str"}
_PART_TAGS = {"input_text", "output_text", "text", "refusal", "input_image", "input_file", "input_audio"}


def _item_place(loc: tuple[int | str, ...], kind: str) -> str:
    """``input[0].content[1].text`` from a pydantic location (whose second part is the item's tag)."""
    if not loc:
        return "input"
    where = f"input[{loc[0]}]"
    for index, part in enumerate(loc[2:]):
        if isinstance(part, int):
            where += f"[{part}]"
        elif part in _BRANCH_NAMES or "[" in part or (part in _PART_TAGS and isinstance(loc[1 + index], int)):
            continue
        else:
            where += f".{part}"
    if kind == "union_tag_invalid" and len(loc) == 1:
        where += ".type"
    return where


def check_fields(body: ResponseRequest) -> None:
    """What the schema cannot say: combinations of fields this server refuses (a 400 naming one)."""
    if body.stream_options is not None and not body.stream:
        raise InvalidRequestError("stream_options: only allowed with stream: true.", param="stream_options")
    if body.background and not body.stores:
        raise InvalidRequestError(
            "background: a background response must be stored; drop store: false.", param="background"
        )
    if body.background and body.stream:
        raise InvalidRequestError(
            "stream: a background response is not streamed here; poll GET /v1/responses/{id} instead.", param="stream"
        )
