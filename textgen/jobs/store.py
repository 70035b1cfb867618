"""The job-store contract, shared by every backend, and the factory that picks one.

A job is stored (``queued``), claimed by a runner in some process (``running``: ``owner`` set and a
lease until ``lease_until``), run, and finished (``succeeded`` / ``failed``) or cancelled. The owner
renews the lease while it works; a job whose lease expired (its process died or hung) goes back to
the queue at the next ``requeue_expired`` of any live process, or fails once it used up its attempts.
Claims, renewals and finishes are conditional on the owner, so a job is never handed to two runners,
and a late ``finish`` from a process that lost its lease is discarded: a job finishes once.

A job created with a ``callback_url`` gets a webhook delivery once it ends (``webhook_state``
``pending`` -> ``delivered`` / ``failed``); deliveries are claimed with a lease too, so one that a dead
process left unfinished is taken over.

``create_idempotent`` backs the ``Idempotency-Key`` header: a key remembers the fingerprint of the
request it created a job for, so a retry with the same body gets that job back and a different body
is refused (``IdempotencyConflictError``).

Backends: ``SQLiteJobStore`` (one file, WAL; the embedded default, shareable by the processes of one
machine) and ``RedisJobStore`` (shared by replicas on many machines). This module is the contract and
the helpers every backend shares; it imports no backend (``textgen.backends`` builds one from
``TEXTGEN_JOB_STORE``). One conformance suite (tests/unit/test_job_store.py) runs against both.
"""

from __future__ import annotations

import asyncio
import builtins
import hashlib
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from textgen.access import ANONYMOUS_OWNER
from textgen.errors import InvalidRequestError, JobNotFoundError
from textgen.jobs.states import FINISH_STATES, TERMINAL_STATES, WEBHOOK_OUTCOMES, JobState, WebhookState

logger = logging.getLogger(__name__)

__all__ = ["FINISH_STATES", "TERMINAL_STATES", "WEBHOOK_OUTCOMES", "Job", "JobState", "JobStore", "WebhookState"]


@dataclass(frozen=True)
class Job:
    id: str
    request: dict[str, Any]
    state: JobState
    request_id: str | None
    result: dict[str, Any] | None = None
    error: str | None = None
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0
    owner: str | None = None
    lease_until: float | None = None
    callback_url: str | None = None
    webhook_state: WebhookState | None = None
    webhook_attempts: int = 0
    webhook_error: str | None = None
    webhook_at: float | None = None
    # Whose job it is (``textgen.access`` owner id); ``owner`` above is the process holding its lease.
    tenant: str = ANONYMOUS_OWNER
    # The submitter's token reservation (``ratelimit.Reservation.encode()``), refunded when the job ends.
    reservation: str | None = None
    # Set while the running job does work that may kill its process (``set_phase``); None otherwise.
    phase: str | None = None


@runtime_checkable
class JobStore(Protocol):
    """Storage contract for background jobs. Every state change is atomic across processes."""

    async def open(self) -> None:
        """Connect (ConfigError saying how to fix the URL when the store cannot be used)."""

    async def close(self) -> None: ...

    async def create(
        self,
        request: dict[str, Any],
        *,
        request_id: str | None,
        callback_url: str | None = None,
        tenant: str = ANONYMOUS_OWNER,
        reservation: str | None = None,
    ) -> Job: ...

    async def create_idempotent(
        self,
        request: dict[str, Any],
        *,
        request_id: str | None,
        key: str,
        ttl_s: float,
        callback_url: str | None = None,
        tenant: str = ANONYMOUS_OWNER,
        reservation: str | None = None,
    ) -> tuple[Job, bool]:
        """``(job the key made, False)`` for a replay of the same body within ``ttl_s``; a new job and
        True otherwise. IdempotencyConflictError for the same key with a different body. Keys are
        scoped per ``tenant``: the same key from two tenants names two different jobs."""

    async def get(self, job_id: str, *, tenant: str | None = None) -> Job:
        """The job; JobNotFoundError when unknown (or purged), or when ``tenant`` is given and the job
        is another tenant's (None: any tenant's, for admins and the runner)."""

    async def list(
        self, *, state: JobState | None = None, limit: int = 50, tenant: str | None = None
    ) -> builtins.list[Job]:
        """Newest first; only ``tenant``'s jobs unless it is None."""

    async def claim_next(self, owner: str, lease_s: float) -> Job | None:
        """The oldest queued job, now running under ``owner`` with a lease of ``lease_s``; None if none."""

    async def renew(self, owner: str, job_ids: Sequence[str], lease_s: float) -> set[str]:
        """Extend the leases of those jobs still running under ``owner``; returns their ids (the rest
        were cancelled, or reclaimed after their lease expired, and must stop here)."""

    async def finish(
        self,
        job_id: str,
        owner: str,
        state: JobState,
        *,
        result: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> bool:
        """Record the outcome if the job still runs under ``owner``; False (and nothing written) if not."""

    async def set_phase(self, job_id: str, owner: str, phase: str | None) -> bool:
        """Mark (or, with None, unmark) the job as doing work that may kill its process, e.g.
        "compiling its constraint", while it runs under ``owner``; False (nothing written) if it does not.
        A job whose lease expires while marked is failed by ``requeue_expired`` (``died_in_phase_error``),
        not re-queued: a request that kills the process must not kill every process that retries it."""

    async def create_finished(
        self,
        request: dict[str, Any],
        *,
        request_id: str | None,
        result: dict[str, Any],
        tenant: str = ANONYMOUS_OWNER,
        job_id: str | None = None,
    ) -> Job:
        """Store work that already ran elsewhere (an interactive ``/v1/responses`` call with ``store``) as a
        job that ``succeeded`` now: never queued or claimed, readable with ``get`` and purged with the
        job TTL like any ended job. Not counted as runner throughput (``recent_completions``). ``job_id``: the
        id to store it under (a fresh 32-hex-digit id, chosen before the work ran); default a new one."""

    async def delete(self, job_id: str, *, tenant: str | None = None) -> Job:
        """Delete an ended job now (and any idempotency record pointing at it); returns it as it was.
        JobNotFoundError for an unknown job or (``tenant`` given) another tenant's; JobNotCancellableError
        (409) while it is queued or running: cancel it first."""

    async def cancel(self, job_id: str, *, tenant: str | None = None) -> Job:
        """Cancel a queued or running job; JobNotCancellableError once it ended; JobNotFoundError for
        an unknown job or (``tenant`` given) another tenant's."""

    async def release(self, job_id: str, owner: str) -> bool:
        """Hand a claimed job that never started back to the queue (its attempt does not count)."""

    async def requeue_owned(self, owner: str) -> int:
        """Graceful stop: put ``owner``'s running jobs back in the queue, release its webhook claims."""

    async def requeue_orphaned(self, is_owner_alive: Callable[[str], bool]) -> int:
        """Expire the leases of jobs whose owner is known to be dead (a restart on the same host), so
        the next ``requeue_expired`` takes them without waiting; returns how many."""

    async def requeue_expired(self, max_attempts: int) -> tuple[int, int]:
        """Running jobs whose lease expired go back to the queue, or fail once they were started
        ``max_attempts`` times or when they were marked with a phase (``set_phase``); returns
        ``(requeued, failed)``. Re-queueing clears the phase."""

    async def position(self, job_id: str) -> int | None:
        """How many queued jobs will be claimed before this one; None if it is not queued."""

    async def recent_completions(self, within_s: float, limit: int) -> builtins.list[float]:
        """``finished_at`` of the latest (at most ``limit``) jobs that succeeded or failed in the last
        ``within_s`` seconds, newest first: the measured throughput behind start-time estimates."""

    async def claim_webhook(self, owner: str, lease_s: float) -> Job | None:
        """A job whose webhook is pending and unclaimed (or whose claim expired), now claimed by ``owner``."""

    async def record_webhook(
        self, job_id: str, owner: str, state: WebhookState, *, attempts: int, error: str | None
    ) -> bool:
        """Record delivery progress (``pending``) or its outcome while ``owner`` holds the claim."""

    async def states(self, job_ids: Sequence[str]) -> dict[str, JobState]: ...

    async def purge_finished(self, older_than_s: float) -> int:
        """Delete jobs that ended longer ago than ``older_than_s`` (and idempotency records for them)."""

    async def purge_idempotency(self, older_than_s: float) -> int: ...

    async def count(self, state: JobState) -> int: ...


# -- helpers every backend shares --------------------------------------------------------------------

IDEMPOTENCY_KEY_MAX_LEN = 255
_IDEMPOTENCY_KEY_RE = re.compile(rf"[\x20-\x7e]{{1,{IDEMPOTENCY_KEY_MAX_LEN}}}")


def validate_idempotency_key(key: str) -> str:
    """Return ``key`` if it is 1..255 printable ASCII characters, else raise InvalidRequestError."""
    if not isinstance(key, str) or not _IDEMPOTENCY_KEY_RE.fullmatch(key):
        raise InvalidRequestError(
            f"Invalid Idempotency-Key header: it must be 1 to {IDEMPOTENCY_KEY_MAX_LEN} printable ASCII characters."
        )
    return key


def scoped_idempotency_key(tenant: str, key: str) -> str:
    """The stored form of an Idempotency-Key: its tenant, a space (never part of an owner id), the key."""
    return f"{tenant} {key}"


def check_visible(job: Job, tenant: str | None) -> Job:
    """``job``, or JobNotFoundError when ``tenant`` may not see it (404, so ids leak nothing)."""
    if tenant is not None and job.tenant != tenant:
        raise JobNotFoundError()
    return job


def request_fingerprint(request: dict[str, Any]) -> str:
    """sha256 (hex) of the canonical JSON of a request: equal bodies give equal fingerprints."""
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def check_ttl(ttl_s: float) -> None:
    if ttl_s <= 0:
        raise ValueError(f"ttl_s must be > 0, got {ttl_s}")


def check_finish_state(state: JobState) -> JobState:
    if state not in FINISH_STATES:
        raise ValueError(f"finish() state must be succeeded or failed, got {state!r}")
    return JobState(state)


STILL_RUNNING = "The job is still queued or running; cancel it before deleting it."


def new_job(
    request: dict[str, Any],
    request_id: str | None,
    callback_url: str | None = None,
    tenant: str = ANONYMOUS_OWNER,
    reservation: str | None = None,
    *,
    now: float | None = None,
) -> Job:
    return Job(
        tenant=tenant,
        reservation=reservation,
        id=uuid.uuid4().hex,
        request=json.loads(json.dumps(request)),  # the stored form, detached from the caller's dict
        state=JobState.QUEUED,
        request_id=request_id,
        created_at=time.time() if now is None else now,
        callback_url=callback_url,
    )


async def claim_cancel_safe(
    claim: Awaitable[Job | None], release: Callable[[Job], Awaitable[object]], owner: str
) -> Job | None:
    """Await a claim so that cancelling the caller never strands a job: the claim may still land after
    the caller was cancelled, and such a job is handed straight back with ``release``."""
    pending = asyncio.ensure_future(claim)
    try:
        job = await asyncio.shield(pending)
    except asyncio.CancelledError:
        job = await asyncio.shield(pending)
        if job is not None:
            await release(job)
        raise
    if job is not None:
        logger.debug("Job %s claimed by %s (attempt %d)", job.id, owner, job.attempts)
    return job


DIED_IN_PHASE_PREFIX = "Failed without a retry: the process running it died while "
DIED_IN_PHASE_SUFFIX = (
    ". A request that kills the server is not run again; simplify it (see the structured output limits "
    "in docs/api.md) or check the service logs for its request id."
)


def died_in_phase_error(phase: str) -> str:
    """The error of a job whose process died while it was marked with ``phase``."""
    return DIED_IN_PHASE_PREFIX + phase + DIED_IN_PHASE_SUFFIX


def abandoned_error(attempts: int) -> str:
    return (
        f"Abandoned after {attempts} attempt(s): each time, the process running it stopped renewing its "
        "lease (it crashed, was killed or hung). Check the service logs for that request id."
    )
