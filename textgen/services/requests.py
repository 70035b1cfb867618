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

import re
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
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


MAX_LOGIT_BIAS = 300  # entries; OpenAI's own limit is of this order


def _policy_error(param: str, message: str) -> PydanticCustomError:
    return PydanticCustomError("invalid_field", "{param}: {message}", {"param": param, "message": message})


# What the validator below checks, stated in the OpenAPI schema too (so clients and fuzzers see the bounds).
LOGIT_BIAS_SCHEMA: dict[str, Any] = {
    "propertyNames": {"pattern": "^[0-9]{1,9}$"},
    "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
    "maxProperties": MAX_LOGIT_BIAS,
}


def _logit_bias(value: Any) -> Any:
    """OpenAI's logit_bias: {"token id": bias}, ids as decimal strings, bias in -100..100."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _policy_error("logit_bias", 'must be an object mapping token ids to biases, e.g. {"50256": -100}.')
    if len(value) > MAX_LOGIT_BIAS:
        raise _policy_error("logit_bias", f"at most {MAX_LOGIT_BIAS} entries; this request has {len(value)}.")
    parsed: dict[int, float] = {}
    for key, bias in value.items():
        if isinstance(key, int) and not isinstance(key, bool):
            key = str(key)
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 9):
            raise _policy_error("logit_bias", f"keys are token ids (decimal strings); got {str(key)[:40]!r}.")
        if isinstance(bias, bool) or not isinstance(bias, int | float) or not -100 <= bias <= 100:
            raise _policy_error("logit_bias", f"each bias is a number from -100 to 100; token {key} has {bias!r}.")
        parsed[int(key)] = float(bias)
    return parsed


class TextGenerationRequest(BaseModel):
    """A generation request. ``max_new_tokens`` wins over ``max_length`` when both are given."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"prompt": "The future of AI is", "max_length": 50}]})

    prompt: str = Field(..., min_length=1, max_length=32_000, description="Text to continue.")
    model: str | None = Field(
        None,
        min_length=1,
        max_length=1024,
        description="Which model generates (a TEXTGEN_MODELS name or an alias; GET /v1/models lists them); left "
        "out: the default model. Any other name is 404 model_not_found.",
    )
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
    repetition_penalty: float = Field(
        1.0,
        ge=0.01,
        le=10.0,
        description="> 1 discourages repeating tokens; 0.01..10 (a smaller divisor would overflow the logits).",
    )
    presence_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, description="As OpenAI's: subtracted once from the logit of every token generated so far."
    )
    frequency_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, description="As OpenAI's: subtracted per time a token was generated so far."
    )
    logit_bias: dict[int, float] | None = Field(
        None,
        description='As OpenAI\'s: {"token id": bias}, bias -100..100 added to the logit (at most 300 entries).',
        json_schema_extra=LOGIT_BIAS_SCHEMA,
    )
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="Drop tokens below min_p x the likeliest's probability.")
    min_tokens: int = Field(0, ge=0, le=4096, description="No end-of-sequence or stop string before this many tokens.")
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
        "presence_penalty",
        "frequency_penalty",
        "min_p",
        "min_tokens",
        "seed",
        "timeout_s",
        "logprobs",
        mode="before",
    )(json_number_only)
    _logit_bias_checked = field_validator("logit_bias", mode="before")(_logit_bias)


# ----- OpenAI-compatible API (/v1, and the lines of Batch API files) ---------------------------------
# Every field is honoured, accepted and ignored as metadata, or refused with a 400 naming it: the policy is
# the tables below plus the declared fields (docs/api.md lists them all; tests/unit/test_openai_fields.py
# holds the two together). A field nobody declared (a typo, another server's extension) is a 400 naming it.

# A token-id prompt's length before the engine checks it against TEXTGEN_MAX_PROMPT_TOKENS and the context.
MAX_PROMPT_IDS = 32_000

# Documented by OpenAI, and beyond what this server can do: refused (400 naming the field) unless null.
REFUSED_COMPLETION_FIELDS: dict[str, str] = {
    "suffix": "text after the insertion point (fill-in-the-middle) is not supported by this server.",
}
REFUSED_CHAT_FIELDS: dict[str, str] = {
    "audio": "this model takes and produces text only.",
    "prediction": "predicted outputs are not supported by this server.",
    "reasoning_effort": "the served model is not a reasoning model.",
    "verbosity": "the served model has no verbosity setting; bound the answer with max_completion_tokens.",
    "web_search_options": "this server does not search the web.",
}


def _refuse_undeclared(model: type[BaseModel], data: Any, refused: dict[str, str]) -> Any:
    """The unknown-field policy for a raw request body (before field validation)."""
    if not isinstance(data, dict):
        return data
    for name, value in data.items():
        if name in model.model_fields:
            continue
        if name in refused:
            if value is None:
                continue
            raise PydanticCustomError(
                "unsupported_field", "{param}: not supported: {why}", {"param": name, "why": refused[name]}
            )
        raise PydanticCustomError(
            "unknown_field",
            "{param}: unknown field; this server honours OpenAI's documented fields and a few extensions "
            "(see docs/api.md). Remove it.",
            {"param": str(name)},
        )
    return data


# Pydantic's union-member and validator tags in an error's location ("prompt.constrained-str",
# "stop.list[str]"): not fields a client sent, so they are left out of the param it is shown.
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "tuple", "bytes", "literal"})


# A union member's model name in an error location (``TokenizePromptRequest``): no field is spelled so.
_MODEL_TAG = re.compile(r"[A-Z][a-z0-9]+(?:[A-Z][a-z0-9]+)+")


def _is_type_tag(part: int | str) -> bool:
    if not isinstance(part, str):
        return False
    return part.lower() in _TYPE_TAGS or any(char in part for char in "[(-") or bool(_MODEL_TAG.fullmatch(part))


def param_of(loc: tuple[int | str, ...]) -> str | None:
    """The request field an error is about, dotted (``messages.0.content``); None for the whole body."""
    parts = loc[1:] if loc and loc[0] == "body" else loc
    return ".".join(str(part) for part in parts if not _is_type_tag(part)) or None


def describe_validation_errors(errors: Sequence[Mapping[str, Any]]) -> tuple[str | None, str]:
    """(param, message) for the first error of a request body's validation: the field it names (a
    policy error names its field in ``ctx.param``; others by their location) and a message that starts
    with it. Shared by the /v1 routes and Batch API lines."""
    first = errors[0]
    context = first.get("ctx") or {}
    if isinstance(context.get("param"), str):
        return context["param"], str(first["msg"])
    param = param_of(tuple(first["loc"]))
    return param, f"{param}: {first['msg']}" if param else str(first["msg"])


def _token_id_list(value: list[Any], where: str) -> list[int]:
    if not value:
        raise _policy_error("prompt", f"{where} is empty; a token-id prompt needs at least one token.")
    if len(value) > MAX_PROMPT_IDS:
        raise _policy_error("prompt", f"{where} has {len(value)} token ids; at most {MAX_PROMPT_IDS}.")
    if not all(isinstance(item, int) and not isinstance(item, bool) and item >= 0 for item in value):
        raise _policy_error("prompt", f"{where}: token ids are non-negative integers.")
    return value


def _completion_prompt(value: Any) -> Any:
    """A string, a list of strings, a list of token ids or a list of such lists (OpenAI's four forms),
    none empty; errors name ``prompt`` and say which form was meant."""
    if isinstance(value, str):
        if not value:
            raise _policy_error("prompt", "must not be empty.")
        return value
    if not isinstance(value, list) or not value:
        raise _policy_error(
            "prompt", "must be a non-empty string, a list of strings, a list of token ids or a list of such lists."
        )
    if all(isinstance(item, str) for item in value):
        if not all(value):
            raise _policy_error("prompt", "none of the prompts may be empty.")
        return value
    if all(isinstance(item, list) for item in value):
        return [_token_id_list(item, f"prompt {index}") for index, item in enumerate(value)]
    if all(isinstance(item, int) and not isinstance(item, bool) for item in value):
        return _token_id_list(value, "the prompt")
    raise _policy_error(
        "prompt", "mixes kinds; send strings, token ids, or lists of token ids (one kind per request)."
    )


def _text_modality_only(value: Any) -> Any:
    if value is not None and (not isinstance(value, list) or any(item != "text" for item in value)):
        raise _policy_error("modalities", 'only ["text"]: this model takes and produces text only.')
    return value


class _OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(
        None,
        max_length=1024,
        description="The served model's name or an alias (GET /v1/models); left out: the served model. Any "
        "other name is 404 model_not_found.",
    )
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16, description="Completions to generate for each prompt.")
    stop: str | list[str] | None = Field(None, description="Up to 4 stop strings.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stream: bool = Field(False, strict=True)
    stream_options: dict[str, Any] | None = Field(
        None, description='{"include_usage": true} adds a usage chunk. Only with stream: true.'
    )
    presence_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, description="Subtracted once from the logit of every token generated so far."
    )
    frequency_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, description="Subtracted from a token's logit once per time it was generated so far."
    )
    logit_bias: dict[int, float] | None = Field(
        None,
        description=f'{{"token id": bias}}, bias -100..100 added to the logit (at most {MAX_LOGIT_BIAS} entries).',
        json_schema_extra=LOGIT_BIAS_SCHEMA,
    )
    user: str | None = Field(None, max_length=256, description="Metadata: accepted and ignored.")
    ignore_eos: bool = Field(
        False,
        strict=True,
        description="Extension (as in vLLM): generate exactly max_tokens, ignoring end-of-sequence.",
    )
    top_k: int = Field(
        0, ge=-1, le=100_000, description="Extension (as /generate, vLLM): keep the k likeliest tokens; 0 or -1 = all."
    )
    min_p: float = Field(
        0.0, ge=0.0, le=1.0, description="Extension (as vLLM): drop tokens below min_p x the likeliest's probability."
    )
    repetition_penalty: float = Field(
        1.0,
        ge=0.01,
        le=10.0,
        description="Extension (as /generate, vLLM): > 1 discourages any token already seen; 0.01..10 (a smaller "
        "divisor would overflow the logits).",
    )
    min_tokens: int = Field(
        0, ge=0, le=4096, description="Extension (as vLLM): no end-of-sequence or stop string before this many tokens."
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
        "presence_penalty",
        "frequency_penalty",
        "top_k",
        "min_p",
        "repetition_penalty",
        "min_tokens",
        "best_of",
        mode="before",
        check_fields=False,
    )(json_number_only)
    _logit_bias_checked = field_validator("logit_bias", mode="before")(_logit_bias)

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> Any:
        if self.stream_options is not None and not self.stream:
            raise _policy_error("stream_options", "only allowed when stream is true.")
        return self

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return tuple(s for s in stops if s)


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1, max_length=MAX_PROMPT_IDS)]
CompletionPrompt = (
    NonEmptyStr
    | Annotated[list[NonEmptyStr], Field(min_length=1)]
    | TokenIds
    | Annotated[list[TokenIds], Field(min_length=1)]
)


class CompletionRequest(_OpenAIRequest):
    prompt: CompletionPrompt = Field(
        ...,
        description="A prompt, a list of prompts, a prompt as token ids, or a list of those; none may be empty.",
    )
    max_tokens: int | None = Field(16, ge=0, le=4096, description="0 only with echo (the prompt's logprobs alone).")
    logprobs: int | None = Field(
        None, ge=0, le=20, description="Log-probabilities of each token and this many likeliest alternatives."
    )
    echo: bool = Field(
        False, strict=True, description="Return the prompt before the completion (and, with logprobs, its tokens')."
    )
    best_of: int | None = Field(
        None, ge=1, le=16, description="Only n (or 1) is accepted: the server does not rank extra candidates."
    )

    _logprobs_number_only = field_validator("logprobs", mode="before")(json_number_only)
    _prompt_checked = field_validator("prompt", mode="before")(_completion_prompt)

    @model_validator(mode="before")
    @classmethod
    def _policy(cls, data: Any) -> Any:
        return _refuse_undeclared(cls, data, REFUSED_COMPLETION_FIELDS)

    @model_validator(mode="after")
    def _echo_and_best_of(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:
            raise _policy_error("max_tokens", "must be at least 1 (0 only with echo, to score the prompt).")
        if self.best_of is not None and self.best_of != self.n:
            if self.best_of < self.n:
                raise _policy_error("best_of", f"must be at least n ({self.n}).")
            raise _policy_error(
                "best_of",
                "this server does not generate extra candidates to pick the best from; set best_of to n "
                "(or leave it out) and choose among the n choices yourself using logprobs.",
            )
        return self


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
    modalities: list[Literal["text"]] | None = Field(None, description='Only ["text"]: the model produces text.')
    _modalities_text_only = field_validator("modalities", mode="before")(_text_modality_only)
    # Metadata: accepted and ignored (what OpenAI stores or routes by; nothing here changes the output).
    metadata: dict[str, str] | None = Field(None, description="Metadata: accepted and ignored.")
    store: bool | None = Field(None, description="Metadata: accepted and ignored (nothing is stored for distillation).")
    service_tier: str | None = Field(None, max_length=64, description="Metadata: accepted and ignored.")
    prompt_cache_key: str | None = Field(None, max_length=1024, description="Metadata: accepted and ignored.")
    prompt_cache_retention: str | None = Field(None, max_length=64, description="Metadata: accepted and ignored.")
    safety_identifier: str | None = Field(None, max_length=256, description="Metadata: accepted and ignored.")

    @model_validator(mode="before")
    @classmethod
    def _policy(cls, data: Any) -> Any:
        return _refuse_undeclared(cls, data, REFUSED_CHAT_FIELDS)
