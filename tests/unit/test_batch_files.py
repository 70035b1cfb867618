"""File storage for batches: multipart uploads parsed as they stream in (whatever the chunking), limits
enforced before the bytes are all there, lines read back in bounded pieces; and batch line checks."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from textgen.batches.files import FileStorage, RawLine, receive_upload
from textgen.batches.store import Line
from textgen.errors import InvalidRequestError, PayloadTooLargeError, UnsupportedMediaTypeError
from textgen.jobs.store import Job, JobState
from textgen.json_limits import MAX_JSON_DEPTH, json_too_deep
from textgen.workers.coordinator import check_line, output_line


def multipart(content: bytes, purpose: str = "batch", filename: str = "in.jsonl") -> tuple[str, bytes]:
    request = httpx.Request(
        "POST", "http://x/v1/files", data={"purpose": purpose}, files={"file": (filename, content, "application/jsonl")}
    )
    return request.headers["content-type"], request.read()


def leftovers(folder: Path) -> list[Path]:
    return list(folder.iterdir())


async def chunks(body: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


@pytest.mark.parametrize("chunk_size", [1, 7, 64 * 1024])
async def test_an_upload_is_parsed_whatever_the_chunking(tmp_path: Path, chunk_size: int) -> None:
    content = b'{"a": 1}\n\n{"b": "--boundary-like \\r\\n text"}\n{"c": 3}'
    content_type, body = multipart(content)
    storage = FileStorage(tmp_path)
    upload = await receive_upload(content_type, chunks(body, chunk_size), storage, max_bytes=1000, max_lines=10)
    assert (upload.filename, upload.purpose, upload.bytes, upload.lines) == ("in.jsonl", "batch", len(content), 4)
    assert upload.temp_path.read_bytes() == content


async def test_an_upload_over_the_size_limit_is_refused_before_it_is_all_read(tmp_path: Path) -> None:
    content_type, body = multipart(b"x" * 10_000)
    read = 0

    async def counted() -> AsyncIterator[bytes]:
        nonlocal read
        async for chunk in chunks(body, 1000):
            read += len(chunk)
            yield chunk

    with pytest.raises(PayloadTooLargeError, match="TEXTGEN_BATCH_MAX_FILE_BYTES"):
        await receive_upload(content_type, counted(), FileStorage(tmp_path), max_bytes=3000, max_lines=10)
    assert read < len(body)
    assert leftovers(tmp_path) == [], "the partial file is removed"


async def test_line_limit_and_a_form_without_file(tmp_path: Path) -> None:
    content_type, body = multipart(b"{}\n" * 6)
    with pytest.raises(InvalidRequestError, match="TEXTGEN_BATCH_MAX_LINES"):
        await receive_upload(content_type, chunks(body, 50), FileStorage(tmp_path), max_bytes=1000, max_lines=5)
    no_file = httpx.Request("POST", "http://x/", data={"purpose": "batch"}, files={"other": ("x", b"1")})
    with pytest.raises(InvalidRequestError, match="no 'file' part"):
        await receive_upload(
            no_file.headers["content-type"],
            chunks(no_file.read(), 50),
            FileStorage(tmp_path),
            max_bytes=99,
            max_lines=9,
        )
    with pytest.raises(UnsupportedMediaTypeError, match="multipart/form-data"):
        await receive_upload("application/json", chunks(b"{}", 2), FileStorage(tmp_path), max_bytes=99, max_lines=9)
    assert leftovers(tmp_path) == []


def test_lines_are_read_in_pieces_and_an_over_long_line_is_skipped_not_loaded(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path)
    storage.path("file-a").write_bytes(b"one\n\n" + b"x" * 5000 + b"\nfour\nfive")
    first = storage.read_lines("file-a", 0, 1, 2, max_line_bytes=100)
    assert [(line.number, line.data) for line in first] == [(1, b"one\n"), (3, None)]
    rest = storage.read_lines("file-a", first[-1].end_offset, first[-1].number + 1, 10, max_line_bytes=100)
    assert [(line.number, line.data) for line in rest] == [(4, b"four\n"), (5, b"five")]
    with pytest.raises(InvalidRequestError):
        storage.path("../etc/passwd")


def request_line(**changes: object) -> RawLine:
    item = {"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"prompt": "hi"}, **changes}
    return RawLine(3, json.dumps(item).encode(), 0)


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (RawLine(3, b"{nope", 0), "invalid_json_line"),
        (RawLine(3, b"[1, 2]", 0), "invalid_json_line"),
        (RawLine(3, None, 0), "line_too_long"),
        (request_line(custom_id=""), "invalid_custom_id"),
        (request_line(method="GET"), "invalid_method"),
        (request_line(url="/v1/embeddings"), "mismatched_url"),
        (request_line(body={"prompt": "hi", "stream": True}), "invalid_body"),
        (request_line(body={"prompt": "hi", "n": 0}), "invalid_body"),
        (request_line(body="hi"), "invalid_body"),
    ],
)
def test_bad_lines_are_named(line: RawLine, code: str) -> None:
    custom_id, error = check_line(line, "/v1/completions", 100)
    assert custom_id is None and error is not None
    assert (error["code"], error["line"]) == (code, 3)


@pytest.mark.parametrize(
    ("url", "body", "param"),
    [
        ("/v1/completions", {"prompt": "hi", "guided_json": {}}, "body.guided_json"),  # unknown field
        ("/v1/completions", {"prompt": "hi", "suffix": "x"}, "body.suffix"),  # documented, refused
        ("/v1/completions", {"prompt": "hi", "best_of": 3}, "body.best_of"),
        ("/v1/completions", {"prompt": [1, "a"]}, "body.prompt"),
        ("/v1/completions", {"prompt": "hi", "logit_bias": {"x": 1}}, "body.logit_bias"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "audio": {}}, "body.audio"),
    ],
)
def test_lines_with_fields_we_cannot_honour_name_them(url: str, body: dict[str, object], param: str) -> None:
    """Batch lines follow the /v1 field policy, and the error names the field (not "body.")."""
    custom_id, error = check_line(request_line(url=url, body=body), url, 10_000)
    assert custom_id is None and error is not None
    assert error["code"] == "invalid_body" and error["param"] == param, error
    assert error["message"].startswith(f"{param}:"), error


@pytest.mark.parametrize(
    "data",
    [
        b'{"custom_id": "a", "body": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        b'{"custom_id": "\\u00e9", "x": ' + b'{"a":' * 1000 + b"1" + b"}" * 1000 + b"}",
    ],
)
def test_a_line_nested_past_the_limit_fails_the_line_not_the_batch_step(data: bytes) -> None:
    """json.loads raised RecursionError here, which failed the validation step at every poll, forever."""
    custom_id, error = check_line(RawLine(3, data, 0), "/v1/completions", 1_000_000)
    assert custom_id is None and error is not None
    assert error["code"] == "invalid_json_line" and str(MAX_JSON_DEPTH) in error["message"]


@pytest.mark.parametrize(
    ("body", "deep"),
    [
        (b"[" * 200 + b"]" * 200, False),
        (b"[" * 201 + b"]" * 201, True),
        (b'["' + b"[" * 10_000 + b'"]', False),  # brackets inside a string do not nest
        (b'["\\"' + b"[" * 300 + b'"]', False),  # nor after an escaped quote
        (b"[]" * 10_000, False),
        (b"{" * 100_000, True),  # not even valid JSON
    ],
)
def test_json_depth_counts_nesting_outside_strings(body: bytes, deep: bool) -> None:
    assert json_too_deep(body) is deep


def test_a_good_line_passes() -> None:
    assert check_line(request_line(), "/v1/completions", 1000) == ("a", None)


def job(state: JobState, result: dict | None = None, error: str | None = None) -> Job:
    return Job(id="j1", request={}, state=state, request_id="r1", result=result, error=error)


def test_output_lines_in_openais_format() -> None:
    ok = {"status_code": 200, "request_id": "r1", "body": {"id": "cmpl-1"}}
    record, to_output = output_line(Line(1, "a", "j1"), job(JobState.SUCCEEDED, ok), None)
    assert to_output and json.loads(record) == {"id": "batch_req_j1", "custom_id": "a", "response": ok, "error": None}
    record, to_output = output_line(Line(1, "a", "j1"), job(JobState.FAILED, error="lost 3 times"), None)
    parsed = json.loads(record)
    assert not to_output and parsed["response"]["status_code"] == 500
    assert parsed["response"]["body"]["error"]["message"] == "lost 3 times"
    record, to_output = output_line(Line(2, "b", None), None, "expired")
    assert not to_output and json.loads(record)["error"]["code"] == "batch_expired"
    record, _ = output_line(Line(2, "b", "j1"), job(JobState.CANCELLED), "cancelled")
    assert json.loads(record)["error"]["code"] == "batch_cancelled" and json.loads(record)["response"] is None
