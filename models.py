"""Request and response schemas of the HTTP API (Pydantic only, no behaviour).

``TextGenerationRequest{prompt, max_length}`` and ``TextGenerationResponse{generated_text, model,
request_id}`` are the original shapes; every newer field is optional and additive.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from textgen.jobs.states import JobState

FinishReasonName = Literal["length", "stop", "eos"]
# The one list of job states (textgen/jobs/states.py); in JSON each is its string value.
JobStateName = JobState


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
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Same seed + same request = same text.")
    stop: list[str] | None = Field(
        None, max_length=8, description="Generation ends before the first of these strings (up to 8)."
    )
    ignore_eos: bool = Field(False, description="Generate exactly the token budget, ignoring end-of-sequence.")
    timeout_s: float | None = Field(
        None, gt=0.0, le=3600.0, description="Deadline counted from arrival; default TEXTGEN_REQUEST_TIMEOUT_S."
    )
    stream: bool = Field(
        False,
        description="Answer with Server-Sent Events: 'token' events with text as it is generated, then one "
        "'done' event with the full response (or an 'error' event). Ignored by /generate_background.",
    )


class Timings(BaseModel):
    queue_s: float = Field(..., description="Time from arrival until the request joined a batch.")
    time_to_first_token_s: float | None = Field(None, description="Time from arrival to the first token.")
    total_s: float = Field(..., description="Time from arrival to the last token.")


class TextGenerationResponse(BaseModel):
    generated_text: str
    model: str
    request_id: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: FinishReasonName = "length"
    timings: Timings | None = None


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


# ----- OpenAI-compatible API (/v1) -------------------------------------------------------------------
# Unknown fields are ignored, as OpenAI's own server does for fields it does not use.


class _OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="Ignored: this server serves one model.")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16, description="Completions to generate for each prompt.")
    stop: str | list[str] | None = Field(None, description="Up to 4 stop strings.")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: dict[str, Any] | None = Field(None, description='{"include_usage": true} adds a usage chunk.')
    ignore_eos: bool = Field(
        False, description="Extension (as in vLLM): generate exactly max_tokens, ignoring end-of-sequence."
    )

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return tuple(s for s in stops if s)


class CompletionRequest(_OpenAIRequest):
    prompt: str | list[str] = Field(..., description="A prompt or a list of prompts.")
    max_tokens: int | None = Field(16, ge=1, le=4096)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str


class ChatCompletionRequest(_OpenAIRequest):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=4096)
    max_completion_tokens: int | None = Field(None, ge=1, le=4096)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
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


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
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
