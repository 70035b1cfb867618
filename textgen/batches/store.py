"""The batch-store contract: file and batch records and the lines of a batch (factories: ``textgen.batches``).

A batch's lines run as ordinary jobs in the job store; this store keeps what the job store does not:
the uploaded files' metadata, each batch's state and counters, and per line its ``custom_id``, the job
that answers it and that job's outcome once seen. It lives beside the job store (tables in the same
SQLite file, or keys under the same Redis prefix), so it is exactly as durable and as shared.

A batch is advanced by one coordinator at a time: ``claim_due`` hands it out under a lease, every write
the coordinator makes is conditional on still holding that lease (``save``), and ``release`` says when
to look again. If a process dies mid-step the lease runs out and any live process resumes from the
stored state. Clients only ever ask for a cancel (``request_cancel``, a separate field) so they never
race the coordinator's writes.
"""

from __future__ import annotations

import builtins
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

from textgen.errors import TextGenError


class FileNotFoundInStoreError(TextGenError):
    status_code = 404
    default_message = "No file with that id."


class BatchNotFoundError(TextGenError):
    status_code = 404
    default_message = "No batch with that id."


class BatchStatus(StrEnum):
    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


ACTIVE_STATUSES: frozenset[BatchStatus] = frozenset(
    {BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS, BatchStatus.FINALIZING, BatchStatus.CANCELLING}
)
CANCELLABLE_STATUSES: frozenset[BatchStatus] = frozenset({BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS})


class LineOutcome(StrEnum):
    SUCCEEDED = "succeeded"  # the job ran and answered 200
    FAILED = "failed"  # the job ran and failed (its error is in the error file)
    CANCELLED = "cancelled"  # never ran: the batch was cancelled or expired first


@dataclass(frozen=True)
class StoredFile:
    id: str
    owner: str
    filename: str
    purpose: str
    bytes: int
    created_at: float
    lines: int = 0
    expires_at: float | None = None  # None: kept until deleted

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and self.expires_at <= now


@dataclass(frozen=True)
class FileQuota:
    """How much one owner may keep stored: files and bytes (0 = no limit)."""

    max_files: int = 0
    max_bytes: int = 0


@dataclass(frozen=True)
class FileUsage:
    """What one owner keeps stored: every file not yet deleted or swept (batch outputs included)."""

    files: int = 0
    bytes: int = 0


@dataclass(frozen=True)
class Batch:
    """A batch as stored. ``submitted``/``submit_offset`` are the submission cursor (lines and input-file
    bytes already turned into jobs), ``ending`` is why it stops early (``cancelled`` / ``expired``)."""

    id: str
    owner: str  # whose it is (tenant id): who may see it
    endpoint: str
    input_file_id: str
    completion_window: str
    window_s: float
    created_at: float
    expires_at: float
    status: BatchStatus = BatchStatus.VALIDATING
    metadata: dict[str, str] | None = None
    request_id: str | None = None
    callback_url: str | None = None
    errors: builtins.list[dict[str, Any]] | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    total: int = 0
    validate_offset: int = 0  # bytes of the input file already validated
    validate_line: int = 0  # number of the last line validated
    completed: int = 0
    failed: int = 0
    submit_offset: int = 0  # bytes of the input file already submitted as jobs
    submit_line: int = 0  # number of the last line read by submission
    submit_done: bool = False
    ending: str | None = None
    queued_stopped: bool = False
    in_progress_at: float | None = None
    finalizing_at: float | None = None
    completed_at: float | None = None
    failed_at: float | None = None
    expired_at: float | None = None
    cancelling_at: float | None = None
    cancelled_at: float | None = None
    cancel_requested_at: float | None = None  # set by clients, never by save()
    webhook: dict[str, Any] = field(default_factory=dict)  # delivery state: attempts, next_at, outcome
    # The creator's rate-limit key (``Caller.rate_key``): every line is charged to it. None in batches
    # stored before it existed (their owner id is used: the same key for keyed callers).
    rate_key: str | None = None
    paced: bool = False  # submission stopped for the owner's rate limits (until a later step)

    def with_(self, **changes: Any) -> Batch:
        return replace(self, **changes)


@dataclass(frozen=True)
class Line:
    number: int  # 1-based, as editors count lines
    custom_id: str
    job_id: str | None = None
    outcome: LineOutcome | None = None


_BATCH_STATE_FIELDS = ("cancel_requested_at",)


def batch_to_json(batch: Batch) -> str:
    data = {k: v for k, v in batch.__dict__.items() if k not in _BATCH_STATE_FIELDS}
    return json.dumps(data, separators=(",", ":"))


def batch_from_json(text: str, cancel_requested_at: float | None) -> Batch:
    data = json.loads(text)
    data["status"] = BatchStatus(data["status"])
    return Batch(**data, cancel_requested_at=cancel_requested_at)


def file_to_json(record: StoredFile) -> str:
    return json.dumps(record.__dict__, separators=(",", ":"))


def file_from_json(text: str) -> StoredFile:
    return StoredFile(**json.loads(text))


@runtime_checkable
class BatchStore(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    # -- files ---------------------------------------------------------------------------------------
    async def put_file(self, record: StoredFile) -> None:
        """Insert or replace (a re-run finalisation writes the same output file id again)."""

    async def get_file(self, file_id: str) -> StoredFile:
        """FileNotFoundInStoreError when unknown."""

    async def list_files(
        self, owner: str | None, *, purpose: str | None = None, limit: int = 100
    ) -> builtins.list[StoredFile]:
        """Newest first; ``owner`` None lists everyone's (admins)."""

    async def add_file(self, record: StoredFile, quota: FileQuota) -> bool:
        """Insert a new file only if its owner's usage with it stays within ``quota``, atomically (two
        uploads racing for the last bytes cannot both get in); False, nothing written, otherwise."""

    async def file_usage(self, owner: str) -> FileUsage:
        """The owner's stored files and their bytes (expired files count until the sweep removes them)."""

    async def expired_files(self, now: float, limit: int) -> builtins.list[StoredFile]:
        """Up to ``limit`` files whose ``expires_at`` is at or before ``now``, soonest first."""

    async def delete_file(self, file_id: str) -> bool:
        """False if there was no such file (another process's sweep may have got there first)."""

    # -- batches -------------------------------------------------------------------------------------
    async def create_batch(self, batch: Batch) -> None: ...

    async def get_batch(self, batch_id: str) -> Batch:
        """BatchNotFoundError when unknown."""

    async def list_batches(self, owner: str | None, *, limit: int = 20) -> builtins.list[Batch]:
        """Newest first; ``owner`` None lists everyone's (admins)."""

    async def request_cancel(self, batch_id: str) -> Batch:
        """Record that a client asked to cancel (first request wins); the coordinator acts on it."""

    async def claim_due(self, worker: str, lease_s: float, limit: int) -> builtins.list[Batch]:
        """Batches that need work (active, or a webhook due) whose lease is free or expired, now
        leased to ``worker``, least recently looked at first."""

    async def save(self, batch: Batch, worker: str) -> bool:
        """Write the batch if ``worker`` still holds its lease; False (nothing written) if not."""

    async def release(self, batch_id: str, worker: str, next_check_at: float, *, done: bool) -> None:
        """Give up the lease; look again at ``next_check_at`` unless ``done`` (nothing left to do)."""

    # -- lines ---------------------------------------------------------------------------------------
    async def clear_lines(self, batch_id: str) -> None: ...

    async def add_lines(self, batch_id: str, lines: Sequence[tuple[int, str]]) -> builtins.list[int]:
        """Record ``(line number, custom_id)`` pairs; returns the numbers of lines whose custom_id another
        line already uses (those are not recorded). Recording the same pair again is not a duplicate."""

    async def set_jobs(self, batch_id: str, jobs: Sequence[tuple[int, str]]) -> None:
        """``(line number, job id)``: the line was submitted as that job."""

    async def open_lines(self, batch_id: str, after: int, limit: int) -> builtins.list[tuple[int, str]]:
        """Submitted lines numbered above ``after`` without an outcome yet, in order: ``(line, job id)``."""

    async def set_outcomes(self, batch_id: str, outcomes: Sequence[tuple[int, LineOutcome]]) -> None:
        """Record each line's outcome once (a second record for the same line is ignored)."""

    async def outcome_counts(self, batch_id: str) -> dict[LineOutcome, int]: ...

    async def lines(self, batch_id: str, after: int, limit: int) -> builtins.list[Line]:
        """Lines numbered above ``after``, in order."""
