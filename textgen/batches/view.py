"""How stored files and batches are shown: OpenAI's ``file`` and ``batch`` objects (routes and webhooks)."""

from __future__ import annotations

from typing import Any

from textgen.batches.store import CANCELLABLE_STATUSES, Batch, BatchStatus, StoredFile


def _seconds(value: float | None) -> int | None:
    return None if value is None else int(value)


def file_object(record: StoredFile) -> dict[str, Any]:
    return {
        "id": record.id,
        "object": "file",
        "bytes": record.bytes,
        "created_at": int(record.created_at),
        "filename": record.filename,
        "purpose": record.purpose,
        "status": "processed",
        "status_details": None,
        "expires_at": _seconds(record.expires_at),
    }


def shown_status(batch: Batch) -> BatchStatus:
    """A cancel asked for but not yet picked up by a coordinator already reads ``cancelling``."""
    if batch.cancel_requested_at is not None and batch.status in CANCELLABLE_STATUSES:
        return BatchStatus.CANCELLING
    return batch.status


def batch_object(batch: Batch) -> dict[str, Any]:
    status = shown_status(batch)
    cancelling_at = batch.cancelling_at or (batch.cancel_requested_at if status is BatchStatus.CANCELLING else None)
    return {
        "id": batch.id,
        "object": "batch",
        "endpoint": batch.endpoint,
        "errors": {"object": "list", "data": batch.errors} if batch.errors else None,
        "input_file_id": batch.input_file_id,
        "completion_window": batch.completion_window,
        "status": status.value,
        "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id,
        "created_at": int(batch.created_at),
        "in_progress_at": _seconds(batch.in_progress_at),
        "expires_at": _seconds(batch.expires_at),
        "finalizing_at": _seconds(batch.finalizing_at),
        "completed_at": _seconds(batch.completed_at),
        "failed_at": _seconds(batch.failed_at),
        "expired_at": _seconds(batch.expired_at),
        "cancelling_at": _seconds(cancelling_at),
        "cancelled_at": _seconds(batch.cancelled_at),
        "request_counts": {"total": batch.total, "completed": batch.completed, "failed": batch.failed},
        "metadata": batch.metadata,
    }
