"""File storage for the Files API: bytes on disk, streamed in and out, never held whole in memory.

Each file is ``<root>/<file id>.jsonl``; metadata lives in the batch store. Uploads and outputs are
written to a temporary name in the same folder and renamed when complete, so a reader (or a process
that restarts) never sees half a file. For SQLite the root sits beside the database; for Redis it is a
folder every replica mounts (``TEXTGEN_FILES_DIR``): Redis keeps everything in memory and has no
streaming values, so files of hundreds of megabytes belong on disk, not in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from textgen.errors import (
    FileQuotaExceededError,
    InvalidRequestError,
    PayloadTooLargeError,
    TextGenError,
    UnsupportedMediaTypeError,
)

READ_CHUNK = 64 * 1024
MAX_FIELD_BYTES = 1024  # a form field that is not the file (purpose, expires_after[...])
MAX_FIELDS = 8
PARSE_SLICE = 64 * 1024  # the parser sees at most this much at a time, so its events stay small


def new_file_id() -> str:
    return f"file-{uuid.uuid4().hex}"


@dataclass(frozen=True)
class Upload:
    filename: str
    purpose: str
    bytes: int
    lines: int
    temp_path: Path
    fields: dict[str, str] = field(default_factory=dict)  # the form's other fields, as text


@dataclass(frozen=True)
class RawLine:
    number: int
    data: bytes | None  # None when the line is longer than the limit (it was skipped, not read)
    end_offset: int


class FileStorage:
    """The files' bytes under ``root``; ``clock`` is the time files are created and expire by (the
    wall clock; tests inject their own)."""

    def __init__(self, root: Path, clock: Callable[[], float] = time.time) -> None:
        self.root = root
        self.clock = clock

    def prepare(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, file_id: str) -> Path:
        if not file_id.replace("-", "").replace("_", "").isalnum():
            raise InvalidRequestError("file id: not a valid id.")
        return self.root / f"{file_id}.jsonl"

    def temp_path(self) -> Path:
        return self.root / f".upload-{uuid.uuid4().hex}.part"

    def commit(self, temp: Path, file_id: str) -> None:
        os.replace(temp, self.path(file_id))

    def delete(self, file_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(file_id).unlink()

    def exists(self, file_id: str) -> bool:
        return self.path(file_id).is_file()

    def read_lines(
        self, file_id: str, offset: int, first_number: int, count: int, max_line_bytes: int
    ) -> list[RawLine]:
        """Up to ``count`` lines from byte ``offset`` (blank lines skipped but counted); a line longer
        than ``max_line_bytes`` comes back with ``data=None`` after being skipped in chunks."""
        lines: list[RawLine] = []
        number = first_number
        with open(self.path(file_id), "rb") as fh:
            fh.seek(offset)
            while len(lines) < count:
                data = fh.readline(max_line_bytes + 1)
                if not data:
                    break
                too_long = len(data) > max_line_bytes and not data.endswith(b"\n")
                if too_long:
                    _skip_rest_of_line(fh)
                if data.strip() or too_long:
                    lines.append(RawLine(number, None if too_long else data, fh.tell()))
                number += 1
        return lines

    def read_chunks(self, file_id: str) -> Iterator[bytes]:
        with open(self.path(file_id), "rb") as fh:
            while chunk := fh.read(READ_CHUNK):
                yield chunk


def _skip_rest_of_line(fh: BinaryIO) -> None:
    while chunk := fh.readline(READ_CHUNK):
        if chunk.endswith(b"\n"):
            return


class OutputWriter:
    """Appends JSONL lines to a temporary file; ``commit`` renames it into place (and returns its size)."""

    def __init__(self, storage: FileStorage, file_id: str) -> None:
        self._storage = storage
        self.file_id = file_id
        self._temp = storage.temp_path()
        self._fh: BinaryIO = open(self._temp, "wb")  # noqa: SIM115 - closed in commit/discard
        self.lines = 0

    def write(self, lines: list[bytes]) -> None:
        for line in lines:
            self._fh.write(line + b"\n")
        self.lines += len(lines)

    def commit(self) -> int:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        size = self._fh.tell()
        self._fh.close()
        self._storage.commit(self._temp, self.file_id)
        return size

    def discard(self) -> None:
        self._fh.close()
        with contextlib.suppress(FileNotFoundError):
            self._temp.unlink()


# -- multipart upload, parsed as it streams in ------------------------------------------------------


@dataclass
class _Part:
    name: str = ""
    filename: str | None = None
    header_field: bytes = b""
    headers: dict[bytes, bytes] | None = None


class _FileSink:
    """Counts bytes and lines of the uploaded file as it is written, refusing it past the limits: the
    file size limit, or what is left of the caller's quota when that is less."""

    def __init__(self, fh: BinaryIO, max_bytes: int, max_lines: int, quota_left: int | None) -> None:
        self._fh = fh
        self._max_bytes = max_bytes if quota_left is None else min(max_bytes, quota_left)
        self._file_limit = max_bytes
        self._max_lines = max_lines
        self.bytes = 0
        self.newlines = 0
        self.last_byte = b"\n"

    async def write(self, data: bytes) -> None:
        self.bytes += len(data)
        if self.bytes > self._max_bytes:
            raise self._too_large()
        self.newlines += data.count(b"\n")
        self.last_byte = data[-1:] or self.last_byte
        self.check_lines()
        await asyncio.to_thread(self._fh.write, data)

    def _too_large(self) -> TextGenError:
        if self.bytes > self._file_limit:
            return PayloadTooLargeError(
                f"The file is larger than this server's limit of {self._file_limit} bytes "
                "(TEXTGEN_BATCH_MAX_FILE_BYTES)."
            )
        return FileQuotaExceededError(
            f"The file would take your stored files past your quota of bytes (TEXTGEN_FILES_MAX_BYTES_PER_TENANT); "
            f"only {self._max_bytes} bytes are left. Delete files you no longer need."
        )

    def check_lines(self) -> None:
        if self.lines > self._max_lines:
            raise InvalidRequestError(
                f"The file has more than {self._max_lines} lines, this server's limit (TEXTGEN_BATCH_MAX_LINES)."
            )

    @property
    def lines(self) -> int:
        return self.newlines + (0 if self.last_byte == b"\n" else 1)


class _Form:
    """The parser's events for one upload, applied in order: the ``file`` part goes to the sink, every
    other part is a small text field."""

    def __init__(self, sink: _FileSink) -> None:
        self.sink = sink
        self.events: list[tuple[str, bytes]] = []
        self.fields: dict[str, bytes] = {}
        self.filename: str | None = None
        self._part = _Part()

    def callbacks(self) -> dict[str, Any]:
        events = self.events
        return {
            "on_part_begin": lambda: events.append(("begin", b"")),
            "on_header_field": lambda data, start, end: events.append(("field", data[start:end])),
            "on_header_value": lambda data, start, end: events.append(("value", data[start:end])),
            "on_header_end": lambda: events.append(("header_end", b"")),
            "on_headers_finished": lambda: events.append(("headers", b"")),
            "on_part_data": lambda data, start, end: events.append(("data", bytes(data[start:end]))),
            "on_part_end": lambda: events.append(("end", b"")),
        }

    async def apply_events(self) -> None:
        part = self._part
        for event, data in self.events:
            if event == "begin":
                part = _Part(headers={})
            elif event == "field":
                part.header_field += data
            elif event == "value" and part.headers is not None:
                # python-multipart bounds each header line (and their count) itself.
                name = part.header_field.lower()
                part.headers[name] = part.headers.get(name, b"") + data
            elif event == "header_end":
                part.header_field = b""
            elif event == "headers":
                _name_part(part)
                if part.name == "file":
                    self.filename = part.filename or "upload.jsonl"
            elif event == "data" and part.name == "file":
                await self.sink.write(data)
            elif event == "data":
                self._add_field_bytes(part.name, data)
        self._part = part
        self.events.clear()

    def _add_field_bytes(self, name: str, data: bytes) -> None:
        value = self.fields.get(name, b"") + data
        if len(value) > MAX_FIELD_BYTES or (name not in self.fields and len(self.fields) >= MAX_FIELDS):
            raise InvalidRequestError(f"The form field {name!r} is too long (or the form has too many fields).")
        self.fields[name] = value


async def receive_upload(
    content_type: str | None,
    body: AsyncIterator[bytes],
    storage: FileStorage,
    *,
    max_bytes: int,
    max_lines: int,
    quota_left: int | None = None,
) -> Upload:
    """Parse a ``multipart/form-data`` body (fields ``file`` and ``purpose``, optionally
    ``expires_after[anchor]`` and ``expires_after[seconds]``) as it arrives, writing the file part
    straight to a temporary file; the caller commits or deletes ``Upload.temp_path``. The parser sees
    at most ``PARSE_SLICE`` bytes at a time, so no step holds the event loop for long."""
    kind, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise UnsupportedMediaTypeError(
            "Upload the file as multipart/form-data (Content-Type: multipart/form-data; boundary=...) "
            "with the fields 'file' and 'purpose'."
        )
    storage.prepare()
    temp = storage.temp_path()
    fh: BinaryIO = await asyncio.to_thread(open, temp, "wb")
    try:
        with fh:
            form = _Form(_FileSink(fh, max_bytes, max_lines, quota_left))
            parser = MultipartParser(boundary, form.callbacks())  # type: ignore[arg-type]
            async for chunk in body:
                for start in range(0, len(chunk), PARSE_SLICE):
                    try:
                        parser.write(chunk[start : start + PARSE_SLICE])
                    except MultipartParseError as error:
                        raise InvalidRequestError(f"The multipart body is malformed ({str(error)[:200]}).") from None
                    await form.apply_events()
            parser.finalize()
            await form.apply_events()
            form.sink.check_lines()
            await asyncio.to_thread(fh.flush)
            await asyncio.to_thread(os.fsync, fh.fileno())
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    if form.filename is None:
        temp.unlink(missing_ok=True)
        raise InvalidRequestError("file: the form has no 'file' part.")
    fields = {name: value.decode("utf-8", "replace") for name, value in form.fields.items()}
    return Upload(
        filename=form.filename,
        purpose=fields.get("purpose", ""),
        bytes=form.sink.bytes,
        lines=form.sink.lines,
        temp_path=temp,
        fields=fields,
    )


def _name_part(part: _Part) -> None:
    """The field name and file name from the part's ``Content-Disposition`` header."""
    disposition = (part.headers or {}).get(b"content-disposition")
    if disposition is None:
        return
    _kind, options = parse_options_header(disposition)
    part.name = options.get(b"name", b"").decode("utf-8", "replace")
    raw_filename = options.get(b"filename")
    part.filename = raw_filename.decode("utf-8", "replace")[:255] if raw_filename is not None else None


# -- expiry ------------------------------------------------------------------------------------------

# OpenAI's bounds for a file's expires_after.seconds: one hour to 30 days.
MIN_EXPIRES_AFTER_S = 3600
MAX_EXPIRES_AFTER_S = 2_592_000


def expires_after_from_form(fields: dict[str, str]) -> int | None:
    """``expires_after`` as OpenAI's files API takes it in a multipart form (``expires_after[anchor]``
    = ``created_at``, the default; ``expires_after[seconds]`` in 3600..2592000): the seconds, or None if
    absent."""
    anchor = fields.get("expires_after[anchor]")
    seconds = fields.get("expires_after[seconds]")
    if anchor is None and seconds is None:
        return None
    # 'created_at' is the only anchor OpenAI defines, so a form that names only the seconds means it, and
    # one that names only the anchor asks for the default expiry.
    if anchor is not None and anchor != "created_at":
        raise InvalidRequestError(f"expires_after[anchor]: must be 'created_at' (got {anchor!r}).")
    if seconds is None:
        return None
    value = (seconds or "").strip()
    if not value.isascii() or not value.isdigit() or not MIN_EXPIRES_AFTER_S <= int(value) <= MAX_EXPIRES_AFTER_S:
        raise InvalidRequestError(
            f"expires_after[seconds]: must be a whole number of seconds from {MIN_EXPIRES_AFTER_S} (1 hour) to "
            f"{MAX_EXPIRES_AFTER_S} (30 days) (got {seconds!r})."
        )
    return int(value)
