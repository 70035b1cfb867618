"""The OpenAI Batch API routes: create, read, list and cancel batches.

Routes only record intent (a new batch, a cancel request) in the batch store and wake the coordinator
(``textgen.workers.coordinator``), which does the work in every process under leases. Each line runs
as a job through the ordinary job runner at background priority (``textgen.services.batch_lines``).
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Query

from textgen.api.deps import CallerDep, RequestIdDep, StateDep
from textgen.api.files import BatchCaller, BatchCallerDep, BatchesDep, keep_until, owned_file
from textgen.api.openai import ERROR_DOCS, OpenAIRoute
from textgen.api.schemas.batch import BatchCreateRequest, BatchList, BatchObject
from textgen.batches.store import CANCELLABLE_STATUSES, Batch, BatchNotFoundError
from textgen.batches.view import batch_object, shown_status
from textgen.errors import InvalidRequestError, TextGenError
from textgen.webhooks import check_webhook

router = APIRouter(prefix="/v1", tags=["batches"], route_class=OpenAIRoute)
DOCS: dict[int | str, dict[str, Any]] = {code: ERROR_DOCS[code] for code in (400, 401, 413, 429, 500)}
NOT_FOUND_DOCS: dict[int | str, dict[str, Any]] = {
    **DOCS,
    404: {"model": ERROR_DOCS[400]["model"], "description": "Unknown batch (or another caller's)"},
}
MAX_WINDOW_S = 7 * 24 * 3600.0
INPUT_KEPT_AFTER_WINDOW_S = 3600.0
_WINDOW_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


class BatchNotCancellableError(TextGenError):
    status_code = 409
    default_message = "The batch has already ended (or is finalizing) and cannot be cancelled."


def window_seconds(window: str) -> float:
    match = re.fullmatch(r"([1-9][0-9]*)([smh])", window)
    if match is None:
        raise InvalidRequestError("completion_window: use '24h' (or another '<n>s', '<n>m', '<n>h').")
    seconds = int(match.group(1)) * _WINDOW_UNITS[match.group(2)]
    if seconds > MAX_WINDOW_S:
        raise InvalidRequestError("completion_window: at most 7 days (168h).")
    return seconds


async def owned_batch(batches: BatchesDep, batch_id: str, caller: BatchCaller) -> Batch:
    """The batch if the caller may see it; 404 for an unknown id and for another owner's batch alike."""
    batch = await batches.store.get_batch(batch_id)
    if not caller.sees(batch.owner):
        raise BatchNotFoundError()
    return batch


@router.post("/batches", response_model=BatchObject, responses=NOT_FOUND_DOCS, summary="Create a batch from a file")
async def create_batch(
    body: BatchCreateRequest,
    state: StateDep,
    batches: BatchesDep,
    caller: BatchCallerDep,
    request_id: RequestIdDep,
    _caller: CallerDep,
) -> BatchObject:
    input_file = await owned_file(batches, body.input_file_id, caller)
    if input_file.purpose != "batch":
        raise InvalidRequestError(
            "input_file_id: the file's purpose must be 'batch'.",
        )
    window_s = window_seconds(body.completion_window)
    callback_url = (body.metadata or {}).get("callback_url") or state.settings.batch_webhook_url
    if (body.metadata or {}).get("callback_url"):
        await check_webhook(callback_url or "", state.settings)
    now = time.time()
    batch = Batch(
        id=f"batch_{uuid.uuid4().hex}",
        owner=caller.owner_id,
        endpoint=body.endpoint,
        input_file_id=input_file.id,
        completion_window=body.completion_window,
        window_s=window_s,
        created_at=now,
        expires_at=now + window_s,
        metadata=body.metadata,
        request_id=request_id,
        callback_url=callback_url,
        rate_key=_caller,  # every line is charged to the creator's limits, after restarts too
    )
    # The input file must outlive the batch's window (and a little more, for the last lines to be read).
    await keep_until(batches, input_file, batch.expires_at + INPUT_KEPT_AFTER_WINDOW_S)
    await batches.store.create_batch(batch)
    batches.coordinator.notify()
    return BatchObject(**batch_object(batch))


@router.get("/batches/{batch_id}", response_model=BatchObject, responses=NOT_FOUND_DOCS, summary="A batch")
async def get_batch(batch_id: str, batches: BatchesDep, caller: BatchCallerDep) -> BatchObject:
    return BatchObject(**batch_object(await owned_batch(batches, batch_id, caller)))


@router.get("/batches", response_model=BatchList, responses=DOCS, summary="The caller's batches, newest first")
async def list_batches(
    batches: BatchesDep, caller: BatchCallerDep, limit: Annotated[int, Query(ge=1, le=100)] = 20
) -> BatchList:
    data = [
        BatchObject(**batch_object(batch))
        for batch in await batches.store.list_batches(caller.visible_owner, limit=limit)
    ]
    return BatchList(data=data, first_id=data[0].id if data else None, last_id=data[-1].id if data else None)


@router.post(
    "/batches/{batch_id}/cancel",
    response_model=BatchObject,
    responses={**NOT_FOUND_DOCS, 409: {"model": ERROR_DOCS[400]["model"], "description": "The batch already ended"}},
    summary="Cancel a batch: queued lines stop at once, running ones finish",
)
async def cancel_batch(batch_id: str, batches: BatchesDep, caller: BatchCallerDep) -> BatchObject:
    batch = await owned_batch(batches, batch_id, caller)
    if shown_status(batch) not in (*CANCELLABLE_STATUSES, "cancelling"):
        raise BatchNotCancellableError()
    batch = await batches.store.request_cancel(batch_id)
    batches.coordinator.notify()
    return BatchObject(**batch_object(batch))
