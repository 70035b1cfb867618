"""Request and response schemas of the HTTP API (Pydantic only, no behaviour).

``TextGenerationRequest{prompt, max_length}`` and ``TextGenerationResponse{generated_text, model,
request_id}`` are the original shapes; every newer field is optional and additive.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from textgen.jobs.states import JobState

FinishReasonName = Literal["length", "stop", "eos"]
# The one list of job states (textgen/jobs/states.py); in JSON each is its string value.
JobStateName = JobState
NonEmptyStr = Annotated[str, Field(min_length=1)]
# The largest integer every JSON client holds exactly (a double's 53-bit mantissa): above it, a client's
# number and the server's integer can differ, and schema and server would disagree near the limit.
MAX_SEED = 2**53 - 1


def _json_number_only(value: Any) -> Any:
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
    )(_json_number_only)


class Timings(BaseModel):
    queue_s: float = Field(..., description="Time from arrival until the request joined a batch.")
    time_to_first_token_s: float | None = Field(None, description="Time from arrival to the first token.")
    total_s: float = Field(..., description="Time from arrival to the last token.")


class TopLogprob(BaseModel):
    token: str
    token_id: int
    logprob: float


class TokenLogprob(BaseModel):
    token: str
    token_id: int
    logprob: float
    top_logprobs: list[TopLogprob] = Field(default_factory=list, description="Likeliest first.")


class TextGenerationResponse(BaseModel):
    generated_text: str
    model: str
    request_id: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: FinishReasonName = "length"
    timings: Timings | None = None
    token_logprobs: list[TokenLogprob] | None = Field(
        None, description="One entry per generated token, when the request set logprobs."
    )


class JobAccepted(BaseModel):
    request_id: str = Field(..., description="Id of the HTTP request that created the job.")
    job_id: str
    state: JobStateName = JobState.QUEUED
    status_url: str


class BackgroundRequest(TextGenerationRequest):
    """A generation request for ``/generate_background``, optionally with a webhook."""

    callback_url: str | None = Field(
        None,
        max_length=2048,
        description="When the job ends (succeeded, failed or cancelled) the service POSTs the job here, signed "
        "with X-TextGen-Signature: sha256=HMAC-SHA256(TEXTGEN_WEBHOOK_SECRET, body), retrying with backoff. "
        "http/https only; private and loopback addresses are refused unless the operator allows them.",
    )


class QueueEstimate(BaseModel):
    position: int = Field(..., description="Queued jobs that will start before this one (0 = next).")
    jobs_per_second: float | None = Field(
        None, description="Jobs finished per second across all workers, measured over the last 10 minutes."
    )
    estimated_start_at: datetime | None = Field(
        None, description="now + (position + 1) / jobs_per_second; null until throughput has been measured."
    )


class WebhookView(BaseModel):
    url: str
    state: Literal["waiting", "pending", "delivered", "failed"] = Field(
        ..., description="waiting: the job has not ended; pending: being delivered or retried."
    )
    attempts: int = 0
    last_error: str | None = None
    last_attempt_at: datetime | None = None


class JobView(BaseModel):
    job_id: str
    state: JobStateName
    request: dict[str, Any]
    result: TextGenerationResponse | None = None
    error: str | None = None
    request_id: str | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    attempts: int = 0
    queue: QueueEstimate | None = Field(None, description="Only while queued, on GET /jobs/{id}.")
    webhook: WebhookView | None = None


class JobSummary(BaseModel):
    """A job in a listing: no prompt, result or callback URL (those are on GET /jobs/{id})."""

    job_id: str
    state: JobStateName
    request_id: str | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    attempts: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class JobList(BaseModel):
    jobs: list[JobSummary]


class ErrorResponse(BaseModel):
    detail: str | list[dict[str, Any]]
    request_id: str


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"


class ReadyResponse(BaseModel):
    status: Literal["ready"] = "ready"
    model: str
    engine: str
    details: dict[str, str] = Field(
        default_factory=dict,
        description="What computes: core, weights, and fused_kernels ('on', or 'off: <reason>; fix: <fix>').",
    )


# ----- OpenAI-compatible API (/v1) -------------------------------------------------------------------
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
    )(_json_number_only)

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

    _logprobs_number_only = field_validator("logprobs", mode="before")(_json_number_only)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str


class ChatCompletionRequest(_OpenAIRequest):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=4096)
    max_completion_tokens: int | None = Field(None, ge=1, le=4096)
    logprobs: bool | None = Field(None, strict=True, description="Return each output token's log-probability.")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="Likeliest alternatives per token (logprobs).")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy completions shape."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "textgen"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIError(BaseModel):
    error: OpenAIErrorDetail
    request_id: str


# ----- the OpenAI Batch API (/v1/files, /v1/batches) -------------------------------------------------------


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str = "processed"
    status_details: str | None = None
    expires_at: int | None = None


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool = False
    first_id: str | None = None
    last_id: str | None = None


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


class BatchCreateRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input_file_id: str = Field(..., min_length=1, max_length=128)
    endpoint: Literal["/v1/completions", "/v1/chat/completions"]
    completion_window: str = Field(
        "24h", pattern=r"^[1-9][0-9]{0,5}[smh]$", description="'24h' as in OpenAI; any '<n>s|m|h' up to 7 days here."
    )
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | None = Field(
        None, max_length=16, description="Up to 16 string pairs; 'callback_url' asks for a webhook when it ends."
    )


class BatchRequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class BatchError(BaseModel):
    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError]


class BatchObject(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str
    status: Literal[
        "validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"
    ]
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: BatchRequestCounts
    metadata: dict[str, str] | None = None


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchObject]
    has_more: bool = False
    first_id: str | None = None
    last_id: str | None = None
