"""Webhook delivery, through the one sender (``textgen.webhooks.WebhookSender``).

Job webhooks: when a job with a ``callback_url`` ends, its webhook is claimed from the job store like a
job (``claim_webhook``), with a claim long enough to cover the whole retry window, so one left
unfinished by a dead process is taken over after that. ``JobWebhooks`` claims them in its own poll
loop (``textgen.workers.loop``) and delivers each in a task, retrying with backoff until a 2xx answer
or the end of ``TEXTGEN_WEBHOOK_RETRY_FOR_S``.

The batch webhook: one POST when a batch ends, to ``metadata["callback_url"]``. Each attempt is one
coordinator step (``BatchWebhooks.attempt``), so a process that dies between attempts leaves the next
one to any other process.

The body holds the job (or batch) as the API shows it, the event and the time it was sent; delivery
is at least once, so receivers dedupe on ``X-TextGen-Delivery``'s id.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from textgen import webhooks
from textgen.batches.store import Batch
from textgen.batches.view import batch_object
from textgen.jobs.store import Job, JobStore, WebhookState
from textgen.workers.loop import STORE_CONDITIONS, PollLoop

logger = logging.getLogger(__name__)

MAX_DELIVERIES = 8  # job webhook deliveries in flight per process
_CLAIM_MARGIN_S = 30.0


def job_payload_bytes(job: Job, view: Callable[[Job], dict[str, Any]]) -> bytes:
    body = {"event": f"job.{job.state.value}", "sent_at": time.time(), "job": view(job)}
    return json.dumps(body, separators=(",", ":")).encode()


class JobWebhooks:
    """Delivers the webhooks of finished jobs that this process claims from the store."""

    def __init__(
        self,
        store: JobStore,
        owner: str,
        sender: webhooks.WebhookSender,
        *,
        view: Callable[[Job], dict[str, Any]],
        retry_for_s: float,
        poll_interval_s: float = 1.0,
        observe: Callable[[str], None] | None = None,
    ) -> None:
        self._store = store
        self._owner = owner
        self._sender = sender
        self._retry_for_s = retry_for_s
        # A claim covers the whole retry window; one left by a dead process is taken over after it.
        self.claim_s = retry_for_s + sender.timeout_s + _CLAIM_MARGIN_S
        self._view = view
        self._observe = observe  # counts each delivery's outcome (metrics)
        self._deliveries: set[asyncio.Task[None]] = set()
        self.loop = PollLoop("textgen-webhooks", self._claim_due, poll_interval_s=poll_interval_s)

    def start(self) -> None:
        self.loop.start()

    def notify(self) -> None:
        """A job just ended: its webhook may be due now."""
        self.loop.notify()

    async def stop(self) -> None:
        """Stop claiming and cancel the deliveries in flight (their claims run out, or the owner's shutdown
        hands them back); then close the sender."""
        await self.loop.stop()
        for task in list(self._deliveries):
            task.cancel()
        if self._deliveries:
            await asyncio.wait(set(self._deliveries))
        await self._sender.close()

    async def claim(self) -> Job | None:
        return await self._store.claim_webhook(self._owner, self.claim_s)

    async def _claim_due(self) -> bool:
        while len(self._deliveries) < MAX_DELIVERIES and not self.loop.stopping:
            job = await self.claim()
            if job is None:
                break
            task = asyncio.create_task(self._deliver_logged(job), name=f"webhook-{job.id}")
            self._deliveries.add(task)
            task.add_done_callback(self._deliveries.discard)
        return False

    async def _deliver_logged(self, job: Job) -> None:
        try:
            outcome = await self.deliver(job)
            if outcome is not WebhookState.PENDING and self._observe is not None:
                self._observe(outcome.value)
        except STORE_CONDITIONS:
            pass  # logged once by the store; the claim expires and the delivery is tried again
        except Exception:
            # The claim expires and another attempt follows; nothing is lost.
            logger.exception("Webhook delivery for job %s crashed", job.id)

    async def deliver(self, job: Job) -> WebhookState:
        """Try until a 2xx answer or until the retry window closes; the outcome is recorded on the job."""
        deadline = time.monotonic() + self._retry_for_s
        attempts = job.webhook_attempts
        while True:
            attempts += 1
            body = job_payload_bytes(job, self._view)  # built (and signed) per attempt: sent_at is this attempt's
            url = job.callback_url or ""
            error = await self._sender.post(url, body, event=f"job.{job.state.value}", delivery=f"{job.id}:{attempts}")
            if error is None:
                logger.info("Webhook for job %s delivered (attempt %d)", job.id, attempts)
                await self._record(job, WebhookState.DELIVERED, attempts, None)
                return WebhookState.DELIVERED
            wait = webhooks.backoff_s(attempts)
            if time.monotonic() + wait >= deadline:
                logger.warning("Webhook for job %s failed after %d attempt(s): %s", job.id, attempts, error)
                await self._record(job, WebhookState.FAILED, attempts, error)
                return WebhookState.FAILED
            if not await self._record(job, WebhookState.PENDING, attempts, error):
                return WebhookState.PENDING  # another process took the delivery over
            await asyncio.sleep(wait)

    async def _record(self, job: Job, state: WebhookState, attempts: int, error: str | None) -> bool:
        return await self._store.record_webhook(job.id, self._owner, state, attempts=attempts, error=error)


class BatchWebhooks:
    """The webhook of a batch that ended: one attempt per coordinator step."""

    def __init__(self, sender: webhooks.WebhookSender, *, retry_for_s: float) -> None:
        self._sender = sender
        self._retry_for_s = retry_for_s

    async def close(self) -> None:
        await self._sender.close()

    async def attempt(self, batch: Batch) -> dict[str, Any]:
        """One delivery attempt; the batch's new webhook state (``pending`` with ``next_at``, ``delivered``
        or ``failed``)."""
        attempts = int(batch.webhook.get("attempts", 0)) + 1
        event = f"batch.{batch.status.value}"
        body = json.dumps(
            {"event": event, "sent_at": time.time(), "batch": batch_object(batch)}, separators=(",", ":")
        ).encode()
        error = await self._sender.post(batch.callback_url or "", body, event=event, delivery=f"{batch.id}:{attempts}")
        if error is None:
            logger.info("Webhook for batch %s delivered (attempt %d)", batch.id, attempts)
            return {"state": "delivered", "attempts": attempts}
        ended_at = batch.completed_at or batch.cancelled_at or batch.expired_at or batch.failed_at or time.time()
        next_at = time.time() + webhooks.backoff_s(attempts)
        if next_at - ended_at > self._retry_for_s:
            logger.warning("Webhook for batch %s failed after %d attempt(s): %s", batch.id, attempts, error)
            return {"state": "failed", "attempts": attempts, "error": error}
        return {"state": "pending", "attempts": attempts, "error": error, "next_at": next_at}
