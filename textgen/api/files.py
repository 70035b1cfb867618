"""The OpenAI Files API, for batch input and output: upload, list, read, download, delete.

Uploads stream straight to disk (``textgen.batches.files``) with the size and line limits checked as
the bytes arrive; downloads stream from disk. Each file belongs to the caller that uploaded it (batch
output files to the batch's owner); another caller gets 404, as for an unknown id.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from starlette.requests import ClientDisconnect

from textgen.access import caller_of
from textgen.api.deps import CallerDep, StateDep
from textgen.api.openai import ERROR_DOCS, OpenAIRoute
from textgen.api.schemas.batch import FileDeleted, FileList, FileObject
from textgen.batches.files import Upload, expires_after_from_form, new_file_id, receive_upload
from textgen.batches.store import FileNotFoundInStoreError, FileQuota, FileUsage, StoredFile
from textgen.batches.view import file_object
from textgen.config import Settings
from textgen.errors import FileQuotaExceededError, GenerationCancelledError, InvalidRequestError, NotReadyError
from textgen.workers.batches import Batches

router = APIRouter(prefix="/v1", tags=["batches"], route_class=OpenAIRoute)
DOCS: dict[int | str, dict[str, Any]] = {code: ERROR_DOCS[code] for code in (400, 401, 413, 429, 500)}
UPLOAD_DOCS: dict[int | str, dict[str, Any]] = {
    **DOCS,
    413: {"model": ERROR_DOCS[413]["model"], "description": "File too large, or the caller's file quota is full"},
    415: {"model": ERROR_DOCS[400]["model"], "description": "Not multipart/form-data (nothing of the body is read)"},
}
NOT_FOUND_DOCS: dict[int | str, dict[str, Any]] = {
    **DOCS,
    404: {"model": ERROR_DOCS[400]["model"], "description": "Unknown file (or another caller's)"},
}
UPLOAD_PURPOSES = ("batch",)


def get_batches(state: StateDep) -> Batches:
    if state.batches is None:
        raise NotReadyError()
    return state.batches


@dataclass(frozen=True)
class BatchCaller:
    """Who is asking, as far as files and batches care (the attributes of ``textgen.access.Caller``)."""

    owner_id: str  # what the caller creates is stored under this
    admin: bool = False

    @property
    def visible_owner(self) -> str | None:
        """The owner whose files and batches this caller may see; None (everyone's) for an admin."""
        return None if self.admin else self.owner_id

    def sees(self, owner: str) -> bool:
        return self.admin or owner == self.owner_id


def batch_caller(request: Request) -> BatchCaller:
    """The one place files and batches learn who the caller is: the API key's id (the principal the
    key middleware records, ``key:`` + a short sha256), or one anonymous owner when no keys are set.

    When the tenants branch (issue 11) lands, this becomes ``return caller_of(request.scope)``
    (``textgen.access``), which has the same attributes and adds admin keys.
    """
    caller = caller_of(request.scope)
    return BatchCaller(caller.owner_id, caller.admin)


BatchesDep = Annotated[Batches, Depends(get_batches)]
BatchCallerDep = Annotated[BatchCaller, Depends(batch_caller)]


async def owned_file(batches: Batches, file_id: str, caller: BatchCaller) -> StoredFile:
    """The file if the caller may see it; 404 for an unknown id, another owner's file and an expired
    file alike (the sweep deletes expired files; until it does they are already gone to clients)."""
    record = await batches.store.get_file(file_id)
    if not caller.sees(record.owner) or record.expired(batches.files.clock()):
        raise FileNotFoundInStoreError()
    return record


def file_quota(settings: Settings) -> FileQuota:
    return FileQuota(settings.files_max_per_tenant, settings.files_max_bytes_per_tenant)


def check_room_for_a_file(usage: FileUsage, quota: FileQuota) -> None:
    """413 before a byte of the upload is read when the caller's stored files leave no room."""
    if quota.max_files and usage.files >= quota.max_files:
        raise FileQuotaExceededError(
            f"You keep {usage.files} files, your quota (TEXTGEN_FILES_MAX_PER_TENANT = {quota.max_files}). "
            "Delete files you no longer need (files also expire: see expires_at)."
        )
    if quota.max_bytes and usage.bytes >= quota.max_bytes:
        raise FileQuotaExceededError(
            f"Your files take {usage.bytes} bytes, your quota (TEXTGEN_FILES_MAX_BYTES_PER_TENANT = "
            f"{quota.max_bytes}). Delete files you no longer need (files also expire: see expires_at)."
        )


async def keep_until(batches: Batches, record: StoredFile, until: float) -> None:
    """Push a file's expiry out to ``until`` if it would expire sooner (a batch's input stays while the
    batch may still read it)."""
    if record.expires_at is not None and record.expires_at < until:
        await batches.store.put_file(replace(record, expires_at=until))


UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "purpose"],
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": "JSONL, one request a line"},
                        "purpose": {"type": "string", "enum": list(UPLOAD_PURPOSES)},
                        "expires_after[anchor]": {"type": "string", "enum": ["created_at"]},
                        "expires_after[seconds]": {"type": "integer", "minimum": 3600, "maximum": 2592000},
                    },
                }
            }
        },
    }
}


@router.post(
    "/files",
    response_model=FileObject,
    responses=UPLOAD_DOCS,
    openapi_extra=UPLOAD_BODY,  # read as a stream by the route, so FastAPI cannot derive it
    summary="Upload a JSONL file (purpose=batch)",
)
async def upload_file(
    request: Request, state: StateDep, batches: BatchesDep, caller: BatchCallerDep, _caller: CallerDep
) -> FileObject:
    settings = state.settings
    quota = file_quota(settings)
    usage = await batches.store.file_usage(caller.owner_id)
    check_room_for_a_file(usage, quota)
    try:
        upload = await receive_upload(
            request.headers.get("content-type"),
            request.stream(),
            batches.files,
            max_bytes=settings.batch_max_file_bytes,
            max_lines=settings.batch_max_lines,
            quota_left=quota.max_bytes - usage.bytes if quota.max_bytes else None,
        )
    except ClientDisconnect:  # the client left, or the body limit answered 413 and cut the body off
        raise GenerationCancelledError("The upload ended before its last byte.") from None
    try:
        record = new_file_record(upload, caller.owner_id, batches.files.clock(), settings.files_expire_after_s)
        batches.files.commit(upload.temp_path, record.id)
    except BaseException:
        upload.temp_path.unlink(missing_ok=True)
        raise
    try:
        added = await batches.store.add_file(record, quota)
    except BaseException:
        batches.files.delete(record.id)
        raise
    if not added:  # another upload of the same caller took the room meanwhile
        batches.files.delete(record.id)
        check_room_for_a_file(await batches.store.file_usage(caller.owner_id), quota)
        raise FileQuotaExceededError(
            "The file would take your stored files past your quota (TEXTGEN_FILES_MAX_BYTES_PER_TENANT). "
            "Delete files you no longer need."
        )
    return FileObject(**file_object(record))


def new_file_record(upload: Upload, owner: str, now: float, default_expiry_s: int) -> StoredFile:
    """The record of an upload: purpose checked, expiry from ``expires_after`` or the default."""
    if upload.purpose not in UPLOAD_PURPOSES:
        raise InvalidRequestError(f"purpose: must be one of {', '.join(UPLOAD_PURPOSES)} (got {upload.purpose!r}).")
    expires_after_s = expires_after_from_form(upload.fields) or default_expiry_s
    return StoredFile(
        id=new_file_id(),
        owner=owner,
        filename=upload.filename,
        purpose=upload.purpose,
        bytes=upload.bytes,
        created_at=now,
        lines=upload.lines,
        expires_at=now + expires_after_s if expires_after_s else None,
    )


@router.get("/files", response_model=FileList, responses=DOCS, summary="The caller's files, newest first")
async def list_files(
    batches: BatchesDep,
    caller: BatchCallerDep,
    purpose: Annotated[str | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
) -> FileList:
    now = batches.files.clock()
    records = [
        record
        for record in await batches.store.list_files(caller.visible_owner, purpose=purpose, limit=limit)
        if not record.expired(now)
    ]
    data = [FileObject(**file_object(record)) for record in records]
    return FileList(
        data=data, first_id=data[0].id if data else None, last_id=data[-1].id if data else None, has_more=False
    )


@router.get("/files/{file_id}", response_model=FileObject, responses=NOT_FOUND_DOCS, summary="A file's metadata")
async def get_file(file_id: str, batches: BatchesDep, caller: BatchCallerDep) -> FileObject:
    return FileObject(**file_object(await owned_file(batches, file_id, caller)))


@router.get(
    "/files/{file_id}/content",
    response_class=StreamingResponse,
    responses=NOT_FOUND_DOCS,
    summary="A file's bytes (streamed)",
)
async def file_content(file_id: str, batches: BatchesDep, caller: BatchCallerDep) -> StreamingResponse:
    await owned_file(batches, file_id, caller)
    if not batches.files.exists(file_id):
        raise FileNotFoundInStoreError("The file's content is gone from the file storage.")
    chunks: Iterator[bytes] = batches.files.read_chunks(file_id)  # a sync iterator: read in a worker thread
    return StreamingResponse(chunks, media_type="application/octet-stream")


@router.delete("/files/{file_id}", response_model=FileDeleted, responses=NOT_FOUND_DOCS, summary="Delete a file")
async def delete_file(file_id: str, batches: BatchesDep, caller: BatchCallerDep) -> FileDeleted:
    await owned_file(batches, file_id, caller)
    deleted = await batches.store.delete_file(file_id)
    batches.files.delete(file_id)
    return FileDeleted(id=file_id, deleted=deleted)
