"""What a caller may ask for, validated: the native generation request and the OpenAI completion and
chat requests (Pydantic models, no behaviour beyond validation).

These live in the service layer, not in ``textgen.api``, because three entry points read them: the HTTP
routes, the job runner (a stored ``/generate_background`` request is validated again before it runs) and
the batch-line planner and executor (each line of a Batch API file is one of the OpenAI requests). The
HTTP schemas (``textgen.api.schemas``) are built on these; the generation service itself sees only the
domain form (``textgen.generation.TextRequest``), made by ``textgen.services.native.text_request``. Pydantic
only: importing these (or ``models.py``) loads neither the engine nor torch.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

NonEmptyStr = Annotated[str, Field(min_length=1)]
# The largest integer every JSON client holds exactly (a double's 53-bit mantissa): above it, a client's
# number and the server's integer can differ, and schema and server would disagree near the limit.
MAX_SEED = 2**53 - 1


def json_number_only(value: Any) -> Any:
    """Where the schema says number or integer, only a JSON number will do: pydantic's lax mode would also
    take true/false and numeric strings. (1.0 still counts as an integer, as in JSON Schema.)"""
    if isinstance(value, (bool, str, bytes)):
        raise PydanticCustomError("number_type", "Input should be a number, not {kind}", {"kind": type(value).__name__})
    return value


class TextGenerationRequest(BaseModel):
    """A generation request. ``max_new_tokens`` wins over ``max_length`` when both are given."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"prompt": "The future of AI is", "max_length": 50}]})

    prompt: str = Field(..., min_length=1, max_length=32_000, description="Text to continue.")
    max_length: int = Field(
        50,
        ge=1,
        le=2048,
        description="Prompt plus generated tokens (the original meaning). Ignored when max_new_tokens is set.",
    )
    max_new_tokens: int | None = Field(
        None, ge=1, le=4096, description="Tokens to generate; wins over max_length when both are given."
    )
    temperature: float = Field(0.7, ge=0.0, le=5.0, description="0 means greedy decoding.")
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="Nucleus sampling: keep the smallest set of this mass.")
    top_k: int = Field(0, ge=0, le=100_000, description="Keep only the k most likely tokens; 0 = no limit.")
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0, description="> 1 discourages repeating tokens.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Same seed + same request = same text.")
    stop: list[str] | None = Field(
        None, max_length=8, description="Generation ends before the first of these strings (up to 8)."
    )
    ignore_eos: bool = Field(
        False, strict=True, description="Generate exactly the token budget, ignoring end-of-sequence."
    )
    timeout_s: float | None = Field(
        None, gt=0.0, le=3600.0, description="Deadline counted from arrival; default TEXTGEN_REQUEST_TIMEOUT_S."
    )
    stream: bool = Field(
        False,
        strict=True,
        description="Answer with Server-Sent Events: 'token' events with text as it is generated, then one "
        "'done' event with the full response (or an 'error' event). Ignored by /generate_background.",
    )
    json_schema: dict[str, Any] | None = Field(
        None,
        description="Structured output: the generated text is JSON valid against this JSON schema (compact, no "
        "free whitespace). At most one of json_schema, regex, choice and grammar.",
        examples=[{"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}],
    )
    regex: str | None = Field(
        None,
        min_length=1,
        max_length=4096,
        description="Structured output: the generated text matches this regular expression.",
    )
    choice: list[NonEmptyStr] | None = Field(
        None,
        min_length=1,
        max_length=256,
        description="Structured output: the generated text is exactly one of these (non-empty) strings.",
    )
    grammar: str | None = Field(
        None,
        min_length=1,
        max_length=65_536,
        description="Structured output: the generated text follows this context-free grammar (Lark syntax as "
        "llguidance reads it, or llama.cpp's GBNF).",
    )
    logprobs: int | None = Field(
        None,
        ge=0,
        le=20,
        description="Return token_logprobs: each generated token's log-probability (after repetition penalty, "
        "constraint and temperature; before top-k/top-p) and this many likeliest alternatives.",
    )

    _numbers_only = field_validator(
        "max_length",
        "max_new_tokens",
        "temperature",
        "top_p",
        "top_k",
        "repetition_penalty",
        "seed",
        "timeout_s",
        "logprobs",
        mode="before",
    )(json_number_only)


# ----- OpenAI-compatible API (/v1, and the lines of Batch API files) ---------------------------------
# Unknown fields are ignored, as OpenAI's own server does for fields it does not use.


class _OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="Ignored: this server serves one model.")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16, description="Completions to generate for each prompt.")
    stop: str | list[str] | None = Field(None, description="Up to 4 stop strings.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stream: bool = Field(False, strict=True)
    stream_options: dict[str, Any] | None = Field(None, description='{"include_usage": true} adds a usage chunk.')
    ignore_eos: bool = Field(
        False,
        strict=True,
        description="Extension (as in vLLM): generate exactly max_tokens, ignoring end-of-sequence.",
    )
    response_format: dict[str, Any] | None = Field(
        None,
        description='{"type": "text"}, {"type": "json_object"} or {"type": "json_schema", "json_schema": '
        '{"name": ..., "schema": {...}}}: the output is JSON (valid against the schema).',
    )

    _numbers_only = field_validator(
        "temperature",
        "top_p",
        "n",
        "seed",
        "max_tokens",
        "max_completion_tokens",
        "top_logprobs",
        mode="before",
        check_fields=False,
    )(json_number_only)

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return tuple(s for s in stops if s)


class CompletionRequest(_OpenAIRequest):
    prompt: NonEmptyStr | Annotated[list[NonEmptyStr], Field(min_length=1)] = Field(
        ..., description="A prompt or a non-empty list of prompts; none may be empty."
    )
    max_tokens: int | None = Field(16, ge=1, le=4096)
    logprobs: int | None = Field(
        None, ge=0, le=20, description="Log-probabilities of each token and this many likeliest alternatives."
    )

    _logprobs_number_only = field_validator("logprobs", mode="before")(json_number_only)


MAX_MESSAGES = 2_048
MAX_CONTENT_PARTS = 256
MAX_TOOLS = 128
MAX_TOOL_CALLS_PER_MESSAGE = 128
# OpenAI's rule for function names (letters, digits, underscores, dashes; at most 64): they are safe to
# write into the prompt and into the tool-call grammar as they are.
FUNCTION_NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
FunctionName = Annotated[str, Field(pattern=FUNCTION_NAME_PATTERN, description="Letters, digits, _ and -; 1-64.")]


class FunctionCall(BaseModel):
    """A call the assistant made: the function's name and its arguments as a JSON string."""

    model_config = ConfigDict(extra="ignore")

    name: FunctionName
    arguments: str = Field("{}", max_length=262_144, description="The arguments as a JSON object, as text.")


class ToolCall(BaseModel):
    """An entry of an assistant message's ``tool_calls``."""

    model_config = ConfigDict(extra="ignore")

    id: str = Field("", max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    """One message of a chat. ``content`` is a string or a list of parts (text parts are joined; the model
    takes text only, so image, audio and file parts are refused with a 400 naming the part). An assistant
    message may carry ``tool_calls`` (or the legacy ``function_call``) and null content; a ``tool`` message
    answers the call named by ``tool_call_id``; a legacy ``function`` message answers by ``name``."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | Annotated[list[dict[str, Any]], Field(max_length=MAX_CONTENT_PARTS)] | None = None
    name: str | None = Field(None, min_length=1, max_length=256, description="The participant's (or function's) name.")
    tool_calls: Annotated[list[ToolCall], Field(max_length=MAX_TOOL_CALLS_PER_MESSAGE)] | None = None
    tool_call_id: str | None = Field(None, max_length=256)
    function_call: FunctionCall | None = None


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: FunctionName
    description: str | None = Field(None, max_length=16_384)
    parameters: dict[str, Any] | None = Field(
        None, description="A JSON schema of the arguments object; omitted means no arguments."
    )
    strict: bool | None = Field(None, description="Accepted: the arguments always follow the schema here.")


class ToolDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"] = Field(..., description="Only function tools are served.")
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_OpenAIRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_tokens: int | None = Field(None, ge=1, le=4096)
    max_completion_tokens: int | None = Field(None, ge=1, le=4096)
    logprobs: bool | None = Field(None, strict=True, description="Return each output token's log-probability.")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="Likeliest alternatives per token (logprobs).")
    tools: Annotated[list[ToolDefinition], Field(max_length=MAX_TOOLS)] | None = Field(
        None, description="Functions the model may call (see 'Tools' in docs/api.md)."
    )
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="none, auto (the default with tools), required, or one named function."
    )
    parallel_tool_calls: bool | None = Field(None, strict=True, description="Allow several calls in one answer.")
    functions: Annotated[list[FunctionDefinition], Field(max_length=MAX_TOOLS)] | None = Field(
        None, description="Legacy form of tools."
    )
    function_call: Literal["none", "auto"] | NamedFunction | None = Field(
        None, description="Legacy form of tool_choice."
    )
