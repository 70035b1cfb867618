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
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from textgen.errors import InvalidRequestError, PayloadTooLargeError

READ_CHUNK = 64 * 1024
MAX_FIELD_BYTES = 1024  # a form field that is not the file (purpose)
MAX_FIELDS = 8


def new_file_id() -> str:
    return f"file-{uuid.uuid4().hex}"


@dataclass(frozen=True)
class Upload:
    filename: str
    purpose: str
    bytes: int
    lines: int
    temp_path: Path


@dataclass(frozen=True)
class RawLine:
    number: int
    data: bytes | None  # None when the line is longer than the limit (it was skipped, not read)
    end_offset: int


class FileStorage:
    def __init__(self, root: Path) -> None:
        self.root = root

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
    """Counts bytes and lines of the uploaded file as it is written, refusing it past the limits."""

    def __init__(self, fh: BinaryIO, max_bytes: int, max_lines: int) -> None:
        self._fh = fh
        self._max_bytes = max_bytes
        self._max_lines = max_lines
        self.bytes = 0
        self.newlines = 0
        self.last_byte = b"\n"

    async def write(self, data: bytes) -> None:
        self.bytes += len(data)
        if self.bytes > self._max_bytes:
            raise PayloadTooLargeError(
                f"The file is larger than this server's limit of {self._max_bytes} bytes "
                "(TEXTGEN_BATCH_MAX_FILE_BYTES)."
            )
        self.newlines += data.count(b"\n")
        self.last_byte = data[-1:] or self.last_byte
        self.check_lines()
        await asyncio.to_thread(self._fh.write, data)

    def check_lines(self) -> None:
        if self.lines > self._max_lines:
            raise InvalidRequestError(
                f"The file has more than {self._max_lines} lines, this server's limit (TEXTGEN_BATCH_MAX_LINES)."
            )

    @property
    def lines(self) -> int:
        return self.newlines + (0 if self.last_byte == b"\n" else 1)


async def receive_upload(
    content_type: str | None,
    body: AsyncIterator[bytes],
    storage: FileStorage,
    *,
    max_bytes: int,
    max_lines: int,
) -> Upload:
    """Parse a ``multipart/form-data`` body (fields ``file`` and ``purpose``) as it arrives, writing the
    file part straight to a temporary file; the caller commits or deletes ``Upload.temp_path``."""
    kind, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise InvalidRequestError("Upload the file as multipart/form-data with the fields 'file' and 'purpose'.")
    storage.prepare()
    temp = storage.temp_path()
    events: list[tuple[str, bytes]] = []
    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": lambda: events.append(("begin", b"")),
            "on_header_field": lambda data, start, end: events.append(("field", data[start:end])),
            "on_header_value": lambda data, start, end: events.append(("value", data[start:end])),
            "on_header_end": lambda: events.append(("header_end", b"")),
            "on_headers_finished": lambda: events.append(("headers", b"")),
            "on_part_data": lambda data, start, end: events.append(("data", bytes(data[start:end]))),
            "on_part_end": lambda: events.append(("end", b"")),
        },
    )
    fields: dict[str, bytes] = {}
    filename: str | None = None
    fh: BinaryIO = await asyncio.to_thread(open, temp, "wb")
    try:
        with fh:
            sink = _FileSink(fh, max_bytes, max_lines)
            part = _Part()
            async for chunk in body:
                try:
                    parser.write(chunk)
                except MultipartParseError:
                    raise InvalidRequestError("The multipart body is malformed.") from None
                for event, data in events:
                    if event == "begin":
                        part = _Part(headers={})
                    elif event == "field":
                        part.header_field += data
                    elif event == "value" and part.headers is not None:
                        name = part.header_field.lower()
                        part.headers[name] = part.headers.get(name, b"") + data
                    elif event == "header_end":
                        part.header_field = b""
                    elif event == "headers":
                        _name_part(part)
                        if part.name == "file":
                            filename = part.filename or "upload.jsonl"
                    elif event == "data" and part.name == "file":
                        await sink.write(data)
                    elif event == "data":
                        value = fields.get(part.name, b"") + data
                        if len(value) > MAX_FIELD_BYTES or len(fields) > MAX_FIELDS:
                            raise InvalidRequestError(f"The form field {part.name!r} is too long.")
                        fields[part.name] = value
                events.clear()
            parser.finalize()
            sink.check_lines()
            await asyncio.to_thread(fh.flush)
            await asyncio.to_thread(os.fsync, fh.fileno())
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    if filename is None:
        temp.unlink(missing_ok=True)
        raise InvalidRequestError("file: the form has no 'file' part.")
    purpose = fields.get("purpose", b"").decode("utf-8", "replace")
    return Upload(filename=filename, purpose=purpose, bytes=sink.bytes, lines=sink.lines, temp_path=temp)


def _name_part(part: _Part) -> None:
    """The field name and file name from the part's ``Content-Disposition`` header."""
    disposition = (part.headers or {}).get(b"content-disposition")
    if disposition is None:
        return
    _kind, options = parse_options_header(disposition)
    part.name = options.get(b"name", b"").decode("utf-8", "replace")
    raw_filename = options.get(b"filename")
    part.filename = raw_filename.decode("utf-8", "replace")[:255] if raw_filename is not None else None
