"""The batch coordinator: moves each batch through OpenAI's statuses, one leased step at a time.

``validating``   read the input file once, line by line: every line must be JSON with a unique
                 ``custom_id``, ``method`` POST, ``url`` equal to the batch's endpoint, a body that the
                 endpoint accepts and no more than TEXTGEN_BATCH_MAX_LINE_BYTES; any failure fails the
                 whole batch (``errors`` names the lines) before a single request runs.
``in_progress``  submit lines as jobs (idempotency key ``batch:<id>:<line>``, so a line resubmitted after
                 a crash is the same job), a chunk per step from a stored byte cursor; the job runner
                 runs them at background priority like any job; each step records the outcome of the
                 lines whose jobs ended. Each line is one request of the batch's owner and reserves its
                 prompt and output tokens from the owner's budget (``Batch.rate_key``) before its job
                 is created, as ``/generate_background`` does; the reservation rides on the job and
                 the runner refunds what the line did not use. A line that does not fit the current
                 window stays unsubmitted (the cursor stops before it) and the batch is looked at again
                 at the next poll: the batch is paced by the limits, never refused, no runner slot waits
                 for budget, and nothing busy-loops. A line that could never fit one window fails on
                 its own with a 429 body saying why.
``finalizing``   write the output and error files from the lines' jobs, in line order.
``cancelling`` / expiry: queued lines are cancelled at once, running ones finish, unsubmitted ones never
                 run; the files are written with what finished, then ``cancelled`` / ``expired``.

Every process runs a coordinator, a poll loop (``textgen.workers.loop.PollLoop``); the store leases each
batch to one of them per step, and every step starts from stored state, so a process killed mid-step
costs only that step (its lease expires and another process repeats it). Memory stays flat: lines are
streamed from disk in chunks, outcomes and outputs are paged from the stores."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from textgen.batches.files import FileStorage, OutputWriter, RawLine
from textgen.batches.store import Batch, BatchStatus, BatchStore, Line, LineOutcome, StoredFile
from textgen.config import Settings
from textgen.engine.types import SamplingParams
from textgen.errors import (
    JobNotCancellableError,
    JobNotFoundError,
    RateLimitedError,
)
from textgen.generation import GenerationService
from textgen.jobs.store import Job, JobState, JobStore
from textgen.json_limits import MAX_JSON_DEPTH, json_too_deep
from textgen.ratelimit import Reservation, TokenBudgetTooLargeError
from textgen.services.requests import ChatCompletionRequest, CompletionRequest, describe_validation_errors
from textgen.workers.loop import STORE_CONDITIONS, PollLoop
from textgen.workers.webhooks import BatchWebhooks

logger = logging.getLogger(__name__)

BATCH_LINE_KIND = "batch_line"
ENDPOINT_MODELS: dict[str, type[CompletionRequest] | type[ChatCompletionRequest]] = {
    "/v1/completions": CompletionRequest,
    "/v1/chat/completions": ChatCompletionRequest,
}
READ_CHUNK_LINES = 500
SCAN_LIMIT = 1000  # open lines checked per step: jobs run in FIFO order, so the oldest finish first
STEP_BUDGET_S = 2.0
MAX_ERRORS = 100
CLAIM_PER_TICK = 8
SWEEP_PAGE = 100  # expired files deleted per store query
SWEEP_MAX_PAGES = 20  # per sweep; the rest wait for the next one
JOB_TO_OUTCOME = {
    JobState.SUCCEEDED: LineOutcome.SUCCEEDED,
    JobState.FAILED: LineOutcome.FAILED,
    JobState.CANCELLED: LineOutcome.CANCELLED,
}


@dataclass(frozen=True)
class LinePlan:
    """What one line will spend: its prompts' tokens and one ``SamplingParams`` per choice it generates;
    ``open_ended`` when it names no output limit (it is then granted what one window allows)."""

    prompt_tokens: int
    params: Sequence[SamplingParams]
    open_ended: bool = False


# Plans a line from its endpoint and body (``textgen.api.batches.batch_line_planner``: the chat template
# and the tokenizer live there); raises for a body it cannot read (the line's job then fails it).
LinePlanner = Callable[[str, dict[str, Any]], Awaitable[LinePlan]]


@dataclass(frozen=True)
class LineBudget:
    """A submitted line's share of the owner's limits: the reservation its job carries, the output limit
    it was granted (when it named none), or why it can never run (``refused``)."""

    reservation: Reservation | None = None
    max_new_tokens: int | None = None
    refused: str | None = None


class LinePaced(Exception):
    """The owner's window has no room for the next line: submit it at a later step."""


def output_file_ids(batch_id: str) -> tuple[str, str]:
    """Fixed per batch, so a finalisation repeated after a crash rewrites the same files."""
    suffix = batch_id.removeprefix("batch_")
    return f"file-{suffix}-output", f"file-{suffix}-errors"


class BatchCoordinator:
    def __init__(
        self,
        store: BatchStore,
        jobs: JobStore,
        files: FileStorage,
        settings: Settings,
        *,
        worker: str,
        notify_runner: Callable[[], None],
        webhooks: BatchWebhooks | None = None,
        service: GenerationService | None = None,
        planner: LinePlanner | None = None,
    ) -> None:
        # The batches, their files, and the webhook sent when one ends.
        self._store = store
        self._files = files
        self._settings = settings
        self._webhooks = webhooks
        self._lease_s = max(settings.job_lease_s, 3 * STEP_BUDGET_S)  # a step never outlives its lease
        # Lines run as jobs of this process's runner, charged (with ``planner``) to their owner's limits.
        self._jobs = jobs
        self._worker = worker
        self._notify_runner = notify_runner
        self._service = service
        self._planner = planner
        self._last_sweep = -math.inf
        self.loop = PollLoop("textgen-batches", self._poll, poll_interval_s=settings.batch_poll_interval_s)

    async def start(self) -> None:
        self.loop.start()

    async def stop(self) -> None:
        await self.loop.stop()
        if self._webhooks is not None:
            await self._webhooks.close()

    def notify(self) -> None:
        self.loop.notify()

    async def _poll(self) -> bool:
        """Sweep expired files when due, then advance the batches that are due; True when a batch has
        more to do right away (lines left to submit): the next poll follows without a pause."""
        await self._sweep_if_due()
        return await self.tick()

    async def _sweep_if_due(self) -> None:
        if time.monotonic() - self._last_sweep < self._settings.files_sweep_interval_s:
            return
        self._last_sweep = time.monotonic()
        await self.sweep_expired_files()

    async def sweep_expired_files(self) -> int:
        """Delete files past their ``expires_at`` (record and bytes); how many this process deleted.
        Every process sweeps; a file another one got to first is skipped."""
        now = self._files.clock()
        deleted = 0
        for _ in range(SWEEP_MAX_PAGES):
            expired = await self._store.expired_files(now, SWEEP_PAGE)
            for record in expired:
                if await self._store.delete_file(record.id):
                    deleted += 1
                await asyncio.to_thread(self._files.delete, record.id)
            if len(expired) < SWEEP_PAGE:
                break
        if deleted:
            logger.info("Deleted %d expired file(s)", deleted)
        return deleted

    async def tick(self) -> bool:
        """Advance every batch that is due (one leased step each); True if one is due again at once."""
        more = False
        for batch in await self._store.claim_due(self._worker, self._lease_s, CLAIM_PER_TICK):
            done = False
            next_at = time.time() + self._settings.batch_poll_interval_s
            try:
                done, again_at = await self._advance(batch)
                next_at = again_at or next_at
            except STORE_CONDITIONS:
                raise
            except LeaseLostError:
                logger.warning("Batch %s was taken over by another process mid-step; leaving it to that one", batch.id)
            except Exception:
                logger.exception("Batch %s: step failed; retrying at the next poll", batch.id)
            await self._store.release(batch.id, self._worker, next_at, done=done)
            more = more or (not done and next_at <= time.time())
        return more

    async def _advance(self, batch: Batch) -> tuple[bool, float | None]:
        """One step; (nothing left to do, when to look again or None for the next poll)."""
        if batch.status is BatchStatus.VALIDATING:
            if batch.cancel_requested_at is not None:
                await self._store.clear_lines(batch.id)
                ended = batch.with_(status=BatchStatus.CANCELLED, cancelled_at=time.time())
                await self._save(ended.with_(webhook=webhook_due(ended)))
                return await self._after_end(batch.id)
            batch = await self._validate(batch)
            if batch.status is BatchStatus.IN_PROGRESS:
                return await self._run(batch)  # start submitting in the same step
            return False, time.time()
        if batch.status in (BatchStatus.IN_PROGRESS, BatchStatus.CANCELLING):
            return await self._run(batch)
        if batch.status is BatchStatus.FINALIZING:
            await self._finalize(batch)
            return await self._after_end(batch.id)
        return await self._deliver_webhook(batch)

    async def _save(self, batch: Batch) -> None:
        if not await self._store.save(batch, self._worker):
            raise LeaseLostError(batch.id)

    # -- validating ------------------------------------------------------------------------------------

    async def _validate(self, batch: Batch) -> Batch:
        """Check the next lines until the step's time is up (resumable from the stored cursor: lines
        recorded by an interrupted step are recorded again harmlessly); then fail or start the batch."""
        started = time.monotonic()
        limit = self._settings.batch_max_line_bytes
        errors = list(batch.errors or [])
        finished = False
        while time.monotonic() - started < STEP_BUDGET_S:
            try:
                raw = await asyncio.to_thread(
                    self._files.read_lines,
                    batch.input_file_id,
                    batch.validate_offset,
                    batch.validate_line + 1,
                    READ_CHUNK_LINES,
                    limit,
                )
            except FileNotFoundError:
                errors.append(_error("missing_file", "The input file no longer exists.", None))
                raw, finished = [], True
            if not raw:
                finished = True
                break
            ids: list[tuple[int, str]] = []
            for line in raw:
                custom_id, error = check_line(line, batch.endpoint, limit)
                if error is not None:
                    errors.append(error)
                elif custom_id is not None:
                    ids.append((line.number, custom_id))
            for duplicate in await self._store.add_lines(batch.id, ids):
                errors.append(_error("duplicate_custom_id", "This custom_id is used by an earlier line.", duplicate))
            batch = batch.with_(
                total=batch.total + len(raw),
                validate_offset=raw[-1].end_offset,
                validate_line=raw[-1].number,
                errors=sorted(errors, key=lambda e: e.get("line") or 0)[:MAX_ERRORS] or None,
            )
            if batch.total > self._settings.batch_max_lines:
                message = f"More than {self._settings.batch_max_lines} requests (TEXTGEN_BATCH_MAX_LINES)."
                errors.append(_error("too_many_requests", message, None))
                finished = True
                break
            await self._save(batch)
        if not finished:
            return batch
        if batch.total == 0 and not errors:
            errors.append(_error("empty_file", "The input file has no requests.", None))
        now = time.time()
        if errors:
            errors = sorted(errors, key=lambda e: e.get("line") or 0)[:MAX_ERRORS]
            await self._store.clear_lines(batch.id)
            await self._save(
                batch.with_(status=BatchStatus.FAILED, failed_at=now, errors=errors, webhook=webhook_due(batch))
            )
            logger.info("Batch %s failed validation (%d error(s))", batch.id, len(errors))
            return await self._store.get_batch(batch.id)
        batch = batch.with_(status=BatchStatus.IN_PROGRESS, in_progress_at=now)
        await self._save(batch)
        logger.info("Batch %s validated: %d request(s)", batch.id, batch.total)
        return batch

    # -- in_progress / cancelling ----------------------------------------------------------------------

    async def _run(self, batch: Batch) -> tuple[bool, float | None]:
        now = time.time()
        if batch.ending is None and batch.cancel_requested_at is not None:
            batch = batch.with_(status=BatchStatus.CANCELLING, cancelling_at=now, ending="cancelled")
            await self._save(batch)
        elif batch.ending is None and now >= batch.expires_at:
            batch = batch.with_(ending="expired")
            await self._save(batch)
            logger.info("Batch %s passed its completion window; stopping its queued lines", batch.id)
        if batch.ending is not None and not batch.queued_stopped:
            await self._stop_queued(batch)
            batch = batch.with_(queued_stopped=True)
            await self._save(batch)
        elif batch.ending is None and not batch.submit_done:
            batch = await self._submit(batch)
        batch, open_left = await self._collect(batch)
        if not (batch.submit_done or batch.ending):
            if batch.paced:  # the owner's window is full: look again at the next poll, not at once
                return False, None
            return False, time.time()  # more lines to submit: the next step follows at once
        if open_left:
            return False, None
        if batch.ending is None:
            batch = batch.with_(status=BatchStatus.FINALIZING, finalizing_at=time.time())
            await self._save(batch)
        await self._finalize(batch)
        return await self._after_end(batch.id)

    async def _submit(self, batch: Batch) -> Batch:
        """Turn the next lines into jobs until the step's time is up or the owner's window is full
        (resumable from the cursor; ``batch.paced`` says which)."""
        started = time.monotonic()
        ttl_s = max(self._settings.idempotency_ttl_s, batch.window_s)
        was_paced = batch.paced
        batch = batch.with_(paced=False)
        while time.monotonic() - started < STEP_BUDGET_S:
            raw = await asyncio.to_thread(
                self._files.read_lines,
                batch.input_file_id,
                batch.submit_offset,
                batch.submit_line + 1,
                READ_CHUNK_LINES // 2,
                self._settings.batch_max_line_bytes,
            )
            if not raw:
                batch = batch.with_(submit_done=True)
                await self._save(batch)
                break
            jobs: list[tuple[int, str]] = []
            submitted: RawLine | None = None
            for line in raw:
                assert line.data is not None  # validation refused over-long lines
                item = json.loads(line.data)
                try:
                    budget = await self._reserve_line(batch, item["body"])
                except LinePaced:
                    batch = batch.with_(paced=True)
                    break
                request = {
                    "kind": BATCH_LINE_KIND,
                    "batch_id": batch.id,
                    "line": line.number,
                    "custom_id": item["custom_id"],
                    "url": batch.endpoint,
                    "body": item["body"],
                }
                if budget.max_new_tokens is not None:
                    request["max_new_tokens"] = budget.max_new_tokens
                if budget.refused is not None:
                    request["refused"] = budget.refused
                reservation = budget.reservation
                try:
                    job, created = await self._jobs.create_idempotent(
                        request,
                        request_id=f"{batch.id}-{line.number}",
                        key=f"batch:{batch.id}:{line.number}",
                        ttl_s=ttl_s,
                        tenant=batch.owner,
                        reservation=reservation.encode() if reservation else None,
                    )
                except BaseException:
                    await self._give_back(reservation)
                    raise
                if not created:  # resubmitted after a crash: the job holds the first reservation
                    await self._give_back(reservation)
                jobs.append((line.number, job.id))
                submitted = line
            await self._store.set_jobs(batch.id, jobs)
            if submitted is not None:
                batch = batch.with_(submit_offset=submitted.end_offset, submit_line=submitted.number)
            await self._save(batch)
            if jobs:
                self._notify_runner()
            if batch.paced:
                # Once when pacing starts, not at every poll that finds the minute still spent.
                logger.log(
                    logging.DEBUG if was_paced else logging.INFO,
                    "Batch %s paced after line %d: its owner's rate limits are spent for this minute; "
                    "the next lines are submitted as the limits allow",
                    batch.id,
                    batch.submit_line,
                )
                break
        return batch

    async def _reserve_line(self, batch: Batch, body: Any) -> LineBudget:
        """Count the line as one request of the batch's owner and reserve its tokens (see the module
        docstring); LinePaced when the owner's current window has no room for it."""
        if self._service is None or self._planner is None:
            return LineBudget()
        service = self._service
        plan: LinePlan | None = None
        try:
            plan = await self._planner(batch.endpoint, body)
        except Exception:  # a body the line's job will fail anyway: count it as a request only
            logger.debug("Batch %s: a line could not be planned", batch.id, exc_info=True)
        try:
            grant = await service.grant(
                batch.rate_key or batch.owner,
                plan.params if plan else (),
                plan.prompt_tokens if plan else 0,
                open_ended=plan.open_ended if plan else False,
                flexible=False,  # what a line may generate does not depend on when it was submitted
                requests=1,
                quiet=True,  # retried at every poll while paced; pacing is logged once by _submit
            )
        except TokenBudgetTooLargeError as error:
            # It could never fit, however long it waited: the line fails on its own (a 429 in its record).
            # It still counts as one request, so such lines cannot flood the runner either.
            refused = error.message
        except RateLimitedError:
            raise LinePaced() from None
        else:
            return LineBudget(grant.reservation, grant.max_new_tokens)
        try:
            await service.rate_limiter.reserve(batch.rate_key or batch.owner, 0, requests=1, quiet=True)
        except RateLimitedError:
            raise LinePaced() from None
        return LineBudget(refused=refused)

    async def _give_back(self, reservation: Reservation | None) -> None:
        if reservation is not None and self._service is not None:
            await self._service.rate_limiter.refund(reservation, reservation.tokens)

    async def _collect(self, batch: Batch) -> tuple[Batch, bool]:
        """Record the outcome of lines whose jobs ended and refresh the counts; (the batch, whether lines
        are still open). Only the oldest SCAN_LIMIT open lines are looked at per step."""
        open_lines = await self._store.open_lines(batch.id, 0, SCAN_LIMIT)
        if open_lines:
            states = await self._jobs.states([job_id for _, job_id in open_lines])
            ended = [
                (
                    number,
                    JOB_TO_OUTCOME.get(states[job_id], LineOutcome.FAILED) if job_id in states else LineOutcome.FAILED,
                )
                for number, job_id in open_lines
                if job_id not in states or states[job_id] in JOB_TO_OUTCOME
            ]
            await self._store.set_outcomes(batch.id, ended)
            still_open = len(open_lines) - len(ended)
        else:
            still_open = 0
        counts = await self._store.outcome_counts(batch.id)
        completed, failed = counts.get(LineOutcome.SUCCEEDED, 0), counts.get(LineOutcome.FAILED, 0)
        if (completed, failed) != (batch.completed, batch.failed):
            batch = batch.with_(completed=completed, failed=failed)
            await self._save(batch)
        return batch, still_open > 0 or len(open_lines) == SCAN_LIMIT

    async def _stop_queued(self, batch: Batch) -> None:
        """Cancel every line still waiting in the queue; running lines are left to finish."""
        after, stopped = 0, 0
        while page := await self._store.open_lines(batch.id, after, READ_CHUNK_LINES):
            states = await self._jobs.states([job_id for _, job_id in page])
            for _number, job_id in page:
                if states.get(job_id) is JobState.QUEUED:
                    with contextlib.suppress(JobNotCancellableError, JobNotFoundError):
                        job = await self._jobs.cancel(job_id)
                        stopped += 1
                        if job.started_at is None:  # it never ran: its owner gets the reservation back
                            await self._give_back(Reservation.decode(job.reservation))
            after = page[-1][0]
        logger.info("Batch %s (%s): %d queued line(s) cancelled", batch.id, batch.ending, stopped)

    # -- finalizing ------------------------------------------------------------------------------------

    async def _finalize(self, batch: Batch) -> None:
        """Write the output and error files (in line order) and the batch's final status."""
        output_id, error_id = output_file_ids(batch.id)
        output, errors = OutputWriter(self._files, output_id), OutputWriter(self._files, error_id)
        completed = failed = 0
        try:
            after = 0
            while page := await self._store.lines(batch.id, after, READ_CHUNK_LINES):
                ok: list[bytes] = []
                bad: list[bytes] = []
                for line in page:
                    job = await self._job_or_none(line)
                    record, succeeded = output_line(line, job, batch.ending)
                    (ok if succeeded else bad).append(record)
                await asyncio.to_thread(output.write, ok)
                await asyncio.to_thread(errors.write, bad)
                completed, failed = completed + len(ok), failed + len(bad)
                after = page[-1].number
            output_size = await asyncio.to_thread(output.commit) if output.lines else None
            error_size = await asyncio.to_thread(errors.commit) if errors.lines else None
        finally:
            if not output.lines:
                output.discard()
            if not errors.lines:
                errors.discard()
        now = time.time()
        created = self._files.clock()
        keep_s = self._settings.batch_output_expire_after_s
        for file_id, size, count in ((output_id, output_size, output.lines), (error_id, error_size, errors.lines)):
            if size is not None:
                kind = "output" if file_id == output_id else "error"
                name = f"{batch.id}_{kind}.jsonl"
                expires_at = created + keep_s if keep_s else None
                # Never refused for quota: the work is done; it counts against the owner's next upload.
                await self._store.put_file(
                    StoredFile(file_id, batch.owner, name, "batch_output", size, created, count, expires_at)
                )
        final: dict[str, Any] = {
            None: {"status": BatchStatus.COMPLETED, "completed_at": now},
            "cancelled": {"status": BatchStatus.CANCELLED, "cancelled_at": now},
            "expired": {"status": BatchStatus.EXPIRED, "expired_at": now},
        }[batch.ending]
        await self._save(
            batch.with_(
                output_file_id=output_id if output_size is not None else None,
                error_file_id=error_id if error_size is not None else None,
                completed=completed,
                failed=failed,
                webhook=webhook_due(batch),
                **final,
            )
        )
        logger.info("Batch %s %s: %d completed, %d failed", batch.id, final["status"], completed, failed)

    async def _job_or_none(self, line: Line) -> Job | None:
        if line.job_id is None:
            return None
        try:
            return await self._jobs.get(line.job_id)
        except JobNotFoundError:
            return None

    # -- after the end: the webhook --------------------------------------------------------------------

    async def _after_end(self, batch_id: str) -> tuple[bool, float | None]:
        batch = await self._store.get_batch(batch_id)
        if batch.webhook.get("state") == "pending":
            return await self._deliver_webhook(batch)
        return True, None

    async def _deliver_webhook(self, batch: Batch) -> tuple[bool, float | None]:
        if batch.webhook.get("state") != "pending":
            return True, None
        if self._webhooks is None:
            logger.warning("Batch %s asks for a webhook but TEXTGEN_WEBHOOK_SECRET is unset; not sent", batch.id)
            await self._save(batch.with_(webhook={**batch.webhook, "state": "failed", "error": "webhooks are off"}))
            return True, None
        webhook = await self._webhooks.attempt(batch)
        await self._save(batch.with_(webhook=webhook))
        if webhook["state"] == "pending":
            return False, float(webhook["next_at"])
        return True, None


def webhook_due(batch: Batch) -> dict[str, Any]:
    """The webhook state of a batch that just ended: pending if it has a callback URL."""
    return {"state": "pending", "attempts": 0} if batch.callback_url else {}


class LeaseLostError(Exception):
    """Another process took the batch over (this one stalled past its lease): stop this step."""


def _error(code: str, message: str, line: int | None, param: str | None = None) -> dict[str, Any]:
    return {"code": code, "message": message, "param": param, "line": line}


def check_line(line: RawLine, endpoint: str, max_line_bytes: int) -> tuple[str | None, dict[str, Any] | None]:
    """``(custom_id, None)`` for a valid request line, ``(None, error)`` otherwise."""
    if line.data is None:
        return None, _error(
            "line_too_long",
            f"The line is longer than {max_line_bytes} bytes (TEXTGEN_BATCH_MAX_LINE_BYTES).",
            line.number,
        )
    if json_too_deep(line.data):  # json.loads would raise RecursionError (and stall the batch)
        message = f"The line nests arrays and objects more than {MAX_JSON_DEPTH} levels deep."
        return None, _error("invalid_json_line", message, line.number)
    try:
        item = json.loads(line.data)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return None, _error("invalid_json_line", "The line is not valid JSON.", line.number)
    if not isinstance(item, dict):
        return None, _error("invalid_json_line", "The line is not a JSON object.", line.number)
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > 512:
        return None, _error(
            "invalid_custom_id", "custom_id must be a string of 1 to 512 characters.", line.number, "custom_id"
        )
    if item.get("method") != "POST":
        return None, _error("invalid_method", "method must be POST.", line.number, "method")
    if item.get("url") != endpoint:
        return None, _error("mismatched_url", f"url must be the batch's endpoint, {endpoint}.", line.number, "url")
    body = item.get("body")
    if not isinstance(body, dict):
        return None, _error("invalid_body", "body must be a JSON object.", line.number, "body")
    if body.get("stream"):
        return None, _error("invalid_body", "stream is not supported in a batch.", line.number, "body.stream")
    try:
        ENDPOINT_MODELS[endpoint].model_validate(body)
    except ValidationError as error:
        param, message = describe_validation_errors(error.errors())
        where = f"body.{param}" if param else "body"
        return None, _error("invalid_body", f"body.{message}" if param else f"body: {message}", line.number, where)
    return custom_id, None


def output_line(line: Line, job: Job | None, ending: str | None) -> tuple[bytes, bool]:
    """The line's record in OpenAI's batch output format, and whether it goes to the output file."""
    record: dict[str, Any] = {"id": f"batch_req_{job.id if job else line.number}", "custom_id": line.custom_id}
    if job is None or job.state is JobState.CANCELLED or job.state not in (JobState.SUCCEEDED, JobState.FAILED):
        code = f"batch_{ending}" if ending else "batch_cancelled"
        record |= {"response": None, "error": {"code": code, "message": f"The request was not run ({code})."}}
        return json.dumps(record, separators=(",", ":")).encode(), False
    if job.state is JobState.SUCCEEDED and job.result is not None:
        record |= {"response": job.result, "error": None}
        return json.dumps(record, separators=(",", ":")).encode(), True
    response = job.result or {
        "status_code": 500,
        "request_id": job.request_id,
        "body": {
            "error": {"message": job.error or "Internal error.", "type": "server_error", "param": None, "code": None}
        },
    }
    record |= {"response": response, "error": None}
    return json.dumps(record, separators=(",", ":")).encode(), False
