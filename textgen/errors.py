"""One exception hierarchy for the whole service.

Every error a client can see is a ``TextGenError`` subclass carrying the HTTP status it maps to and
a message that is safe to show (no internals). ``textgen.api.errors`` turns them into responses;
nothing else in the package knows about HTTP status codes.
"""

from __future__ import annotations

import re

# A client-facing 400 whose message starts with a request field's name ("logit_bias: ...") is about that
# field: it is the ``param`` shown unless one is given.
_FIELD_PREFIX = re.compile(r"^([a-z_][a-z0-9_]*(?:\.[a-z0-9_]+)*): ")


class TextGenError(Exception):
    """Base class: ``status_code`` and a client-safe ``message``; optionally the request field at fault
    (``param``, dotted: ``messages.0.content``) and a machine-readable ``code`` (OpenAI's, e.g.
    ``model_not_found``), both shown in OpenAI's error body under ``/v1``."""

    status_code: int = 500
    default_message: str = "Internal server error."
    default_param: str | None = None
    default_code: str | None = None

    def __init__(
        self,
        message: str | None = None,
        *,
        retry_after_s: float | None = None,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        self.message = message or self.default_message
        self.retry_after_s = retry_after_s
        self.param = param or self.default_param
        self.code = code or self.default_code
        super().__init__(self.message)

    @property
    def shown_param(self) -> str | None:
        """The ``param`` a client is shown: the one given, else (for a 400) the field its message starts with."""
        if self.param is not None or self.status_code != 400:
            return self.param
        match = _FIELD_PREFIX.match(self.message)
        return match.group(1) if match else None


class ContentRejectedError(TextGenError):
    status_code = 400
    default_message = "The request was rejected by the content filter."


class PromptTooLongError(TextGenError):
    status_code = 400
    default_message = "The prompt is too long for this model."


class InvalidRequestError(TextGenError):
    status_code = 400
    default_message = "The request is invalid."


class UnauthorizedError(TextGenError):
    status_code = 401
    default_message = "Missing or invalid API key; send it as 'Authorization: Bearer <key>'."


class JobNotFoundError(TextGenError):
    status_code = 404
    default_message = "No job with that id."


class ModelNotFoundError(TextGenError):
    """The request names a model this server does not serve (OpenAI's 404 ``model_not_found``)."""

    status_code = 404
    default_message = "The model does not exist on this server; GET /v1/models lists the names it serves."
    default_param = "model"
    default_code = "model_not_found"


class JobNotCancellableError(TextGenError):
    status_code = 409
    default_message = "The job has already finished and cannot be cancelled."


class IdempotencyConflictError(TextGenError):
    status_code = 409
    default_message = (
        "This Idempotency-Key was already used with a different request body; use a new key for a new request."
    )


class PayloadTooLargeError(TextGenError):
    status_code = 413
    default_message = "The request body is too large (TEXTGEN_MAX_BODY_BYTES)."


class UnsupportedMediaTypeError(TextGenError):
    status_code = 415
    default_message = "Unsupported Content-Type for this route."


class FileQuotaExceededError(TextGenError):
    """The caller's stored files would pass its quota; 413 (not 429: waiting does not help, deleting
    files does, and clients do not retry a 413)."""

    status_code = 413
    default_message = "Your files would pass this server's storage quota; delete files first."


class RateLimitedError(TextGenError):
    status_code = 429
    default_message = "Rate limit exceeded for this API key; retry after the time in the Retry-After header."


class QueueFullError(TextGenError):
    status_code = 503
    default_message = "The server is at capacity; retry after the time in the Retry-After header."


class NotReadyError(TextGenError):
    status_code = 503
    default_message = "The model is not ready yet (loading, warming up or shutting down); retry shortly."


class ModelUnavailableError(TextGenError):
    """A configured model cannot serve now: its load failed, or loading it would pass
    TEXTGEN_MODEL_MEMORY while the loaded models are busy. The message says which and what to do."""

    status_code = 503
    default_message = "The model cannot be loaded right now; retry after the time in the Retry-After header."
    default_param = "model"
    default_code = "model_unavailable"


class StoreUnavailableError(TextGenError):
    """The store did not answer (Redis unreachable) or stayed locked (SQLite past its busy timeout);
    the request may be retried."""

    status_code = 503
    default_message = "The job store is unavailable right now; retry after the time in the Retry-After header."

    def __init__(self, message: str | None = None, *, retry_after_s: float | None = 2.0) -> None:
        super().__init__(message, retry_after_s=retry_after_s)


class InsufficientStorageError(TextGenError):
    """The store cannot take writes for a reason of the environment (disk full, read-only, Redis out of
    memory); the message names the cause and what to change. Retrying helps only once that is fixed."""

    status_code = 507
    default_message = "The job store cannot store anything right now (out of space); retry later."

    def __init__(self, message: str | None = None, *, retry_after_s: float | None = 30.0) -> None:
        super().__init__(message, retry_after_s=retry_after_s)


class DeadlineExceededError(TextGenError):
    status_code = 504
    default_message = "The request did not finish before its deadline (timeout_s)."


class GenerationCancelledError(TextGenError):
    """The request was cancelled (client went away, job cancelled, or shutdown)."""

    status_code = 499
    default_message = "The request was cancelled."


class EngineError(TextGenError):
    status_code = 500
    default_message = "Generation failed; the error was logged with this request id."


class ConfigError(Exception):
    """Settings or model configuration that cannot work; the message says how to fix it."""


class ModelLoadError(ConfigError):
    """The configured model could not be loaded; the message says what to change."""
