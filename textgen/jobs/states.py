"""Job and webhook states: defined once here, and reused by the store contract, the API schemas
(``textgen.api.schemas.native``) and the metrics. A leaf module (the bottom layer): it imports nothing
from the service.
"""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class WebhookState(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


TERMINAL_STATES: frozenset[JobState] = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
FINISH_STATES: frozenset[JobState] = frozenset({JobState.SUCCEEDED, JobState.FAILED})
WEBHOOK_OUTCOMES: frozenset[WebhookState] = frozenset({WebhookState.DELIVERED, WebhookState.FAILED})
