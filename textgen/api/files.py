"""The OpenAI Files API, for batch input and output: upload, list, read, download, delete.

Uploads stream straight to disk (``textgen.batches.files``) with the size and line limits checked as
the bytes arrive; downloads stream from disk. Each file belongs to the caller that uploaded it (batch
output files to the batch's owner); another caller gets 404, as for an unknown id.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse

from models import FileDeleted, FileList
from models import FileObject as FileObjectModel
from textgen.access import caller_of
from textgen.api.deps import CallerDep, StateDep
from textgen.api.openai import ERROR_DOCS, OpenAIRoute
from textgen.batches import Batches
from textgen.batches.files import new_file_id, receive_upload
from textgen.batches.store import FileNotFoundInStoreError, FileObject
from textgen.batches.view import file_object
from textgen.errors import InvalidRequestError, NotReadyError

router = APIRouter(prefix="/v1", tags=["batches"], route_class=OpenAIRoute)
DOCS: dict[int | str, dict[str, Any]] = {code: ERROR_DOCS[code] for code in (400, 401, 413, 429, 500)}
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


async def owned_file(batches: Batches, file_id: str, caller: BatchCaller) -> FileObject:
    """The file if the caller may see it; 404 for an unknown id and for another owner's file alike."""
    record = await batches.store.get_file(file_id)
    if not caller.sees(record.owner):
        raise FileNotFoundInStoreError()
    return record


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
                    },
                }
            }
        },
    }
}


@router.post(
    "/files",
    response_model=FileObjectModel,
    responses=DOCS,
    openapi_extra=UPLOAD_BODY,  # read as a stream by the route, so FastAPI cannot derive it
    summary="Upload a JSONL file (purpose=batch)",
)
async def upload_file(
    request: Request, state: StateDep, batches: BatchesDep, caller: BatchCallerDep, _caller: CallerDep
) -> FileObjectModel:
    settings = state.settings
    upload = await receive_upload(
        request.headers.get("content-type"),
        request.stream(),
        batches.files,
        max_bytes=settings.batch_max_file_bytes,
        max_lines=settings.batch_max_lines,
    )
    if upload.purpose not in UPLOAD_PURPOSES:
        upload.temp_path.unlink(missing_ok=True)
        raise InvalidRequestError(f"purpose: must be one of {', '.join(UPLOAD_PURPOSES)} (got {upload.purpose!r}).")
    record = FileObject(
        id=new_file_id(),
        owner=caller.owner_id,
        filename=upload.filename,
        purpose=upload.purpose,
        bytes=upload.bytes,
        created_at=time.time(),
        lines=upload.lines,
    )
    batches.files.commit(upload.temp_path, record.id)
    await batches.store.put_file(record)
    return FileObjectModel(**file_object(record))


@router.get("/files", response_model=FileList, responses=DOCS, summary="The caller's files, newest first")
async def list_files(
    batches: BatchesDep,
    caller: BatchCallerDep,
    purpose: Annotated[str | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
) -> FileList:
    records = await batches.store.list_files(caller.visible_owner, purpose=purpose, limit=limit)
    data = [FileObjectModel(**file_object(record)) for record in records]
    return FileList(
        data=data, first_id=data[0].id if data else None, last_id=data[-1].id if data else None, has_more=False
    )


@router.get("/files/{file_id}", response_model=FileObjectModel, responses=NOT_FOUND_DOCS, summary="A file's metadata")
async def get_file(file_id: str, batches: BatchesDep, caller: BatchCallerDep) -> FileObjectModel:
    return FileObjectModel(**file_object(await owned_file(batches, file_id, caller)))


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
