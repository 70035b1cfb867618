"""Schemas of the native API (``/generate``, ``/generate_background``, ``/jobs``, probes, errors).

``TextGenerationRequest{prompt, max_length}`` and ``TextGenerationResponse{generated_text, model,
request_id}`` are the original shapes; every newer field is optional and additive. The request itself is
the service layer's (``textgen.services.requests``); responses are rendered here from the domain's
results (``textgen.generation.TextResult``, ``textgen.jobs.view``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from textgen.jobs.states import JobState
from textgen.services.requests import MAX_SEED, NonEmptyStr, TextGenerationRequest

__all__ = [
    "MAX_SEED",
    "BackgroundRequest",
    "ErrorResponse",
    "FinishReasonName",
    "HealthResponse",
    "JobAccepted",
    "JobList",
    "JobStateName",
    "JobSummary",
    "JobView",
    "NonEmptyStr",
    "QueueEstimate",
    "ReadyResponse",
    "TextGenerationRequest",
    "TextGenerationResponse",
    "Timings",
    "TokenLogprob",
    "TopLogprob",
    "WebhookView",
]

FinishReasonName = Literal["length", "stop", "eos", "content_filter"]
# The one list of job states (textgen/jobs/states.py); in JSON each is its string value.
JobStateName = JobState


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
    cached_tokens: int = Field(
        0, description="Prompt tokens whose keys/values came from the prefix cache (computed before, reused)."
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
