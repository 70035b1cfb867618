"""Attacks on /v1/files and on request parsing: huge uploads, wrong content types, per-tenant quota,
file expiry and deeply nested JSON.

Bodies of hundreds of megabytes come from generators (never held in the test's memory); the app runs
in this process over ASGITransport, so the process's RSS is the server's.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import psutil
import pytest

from textgen.config import Settings

MakeSettings = Callable[..., Settings]
AppClient = Callable[..., Any]
KEY = "alice-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MiB = 1024 * 1024
BOUNDARY = "textgen-test-boundary"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"
LINE = b'{"custom_id": "x", "method": "POST", "url": "/v1/completions", "body": {}}\n'
LONG_LINE = b'{"custom_id": "' + b"x" * 8000 + b'"}\n'  # few lines per MiB: the line limit stays out of the way


class Firehose:
    """A request body of ``total`` bytes, yielded 1 MiB at a time from one reused buffer; records how
    much the server pulled and the process's peak RSS while it did."""

    def __init__(self, total: int, head: bytes = b"", tail: bytes = b"", fill: bytes = LONG_LINE) -> None:
        self.total = total
        self.fill = fill
        self.head = head
        self.tail = tail
        self.pulled = 0
        self.process = psutil.Process()
        self.start_rss = self.process.memory_info().rss
        self.peak_rss = self.start_rss

    async def __aiter__(self) -> AsyncIterator[bytes]:
        chunk = (self.fill * (MiB // len(self.fill) + 1))[:MiB]
        yield self._count(self.head)
        sent = 0
        while sent < self.total:
            piece = chunk if self.total - sent >= MiB else chunk[: self.total - sent]
            sent += len(piece)
            yield self._count(piece)
        yield self._count(self.tail)

    def _count(self, data: bytes) -> bytes:
        self.pulled += len(data)
        self.peak_rss = max(self.peak_rss, self.process.memory_info().rss)
        return data

    @property
    def growth_mib(self) -> float:
        return (self.peak_rss - self.start_rss) / MiB


def multipart_firehose(total: int, *, fields: dict[str, str] | None = None) -> Firehose:
    head = b"".join(
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in {"purpose": "batch", **(fields or {})}.items()
    )
    head += f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n'.encode()
    head += b"Content-Type: application/jsonl\r\n\r\n"
    return Firehose(total, head, f"\r\n--{BOUNDARY}--\r\n".encode())


def settings_for(make_settings: MakeSettings, **overrides: Any) -> Settings:
    return make_settings(api_keys=KEY, batch_poll_interval_s=0.05, **overrides)


async def upload(client: httpx.AsyncClient, data: bytes, **fields: Any) -> httpx.Response:
    form = {"purpose": "batch", **fields}
    return await client.post("/v1/files", headers=AUTH, data=form, files={"file": ("f.jsonl", data)})


# ----- HIGH 5: uploads never buffered in memory ----------------------------------------------------------


async def test_a_300_mb_upload_is_refused_while_reading_without_growing_memory(
    make_settings: MakeSettings, app_client: AppClient
) -> None:
    settings = settings_for(make_settings)  # the default 100 MiB file limit
    async with app_client(settings) as (client, app):
        assert (await upload(client, LINE)).status_code == 200  # warm the upload path first
        body = multipart_firehose(300 * MiB)
        response = await client.post("/v1/files", headers={**AUTH, "Content-Type": MULTIPART}, content=body)
        assert response.status_code == 413, response.text
        assert "TEXTGEN_BATCH_MAX_FILE_BYTES" in response.json()["error"]["message"]
        assert body.pulled <= settings.batch_max_file_bytes + 2 * MiB  # refused as soon as the limit passed
        assert body.growth_mib < 50, f"server memory grew {body.growth_mib:.0f} MiB"
        files_dir = app.state.textgen.batches.files.root
        assert not [p for p in files_dir.iterdir() if p.name.startswith(".upload-")]  # the partial file is gone


@pytest.mark.parametrize("content_type", ["application/json", None, "text/plain", "multipart/form-data"])
async def test_a_300_mb_upload_that_is_not_multipart_is_refused_unread(
    make_settings: MakeSettings, app_client: AppClient, content_type: str | None
) -> None:
    async with app_client(settings_for(make_settings)) as (client, _app):
        body = Firehose(300 * MiB)
        headers = {**AUTH} if content_type is None else {**AUTH, "Content-Type": content_type}
        request = client.build_request("POST", "/v1/files", headers=headers, content=body)
        if content_type is None:
            request.headers.pop("Content-Type", None)
        response = await client.send(request)
        assert response.status_code == 415, response.text
        assert "multipart/form-data" in response.json()["error"]["message"]
        assert body.pulled <= MiB  # at most the first chunk was looked at
        assert body.growth_mib < 50


async def test_a_declared_length_over_the_limit_is_refused_before_reading(
    make_settings: MakeSettings, app_client: AppClient
) -> None:
    async with app_client(settings_for(make_settings, batch_max_file_bytes=4 * MiB)) as (client, _app):
        body = multipart_firehose(300 * MiB)
        headers = {**AUTH, "Content-Type": MULTIPART, "Content-Length": str(300 * MiB + 400)}
        response = await client.post("/v1/files", headers=headers, content=body)
        assert response.status_code == 413
        assert body.pulled <= MiB


async def test_a_huge_part_header_is_refused_not_buffered(make_settings: MakeSettings, app_client: AppClient) -> None:
    async with app_client(settings_for(make_settings, batch_max_file_bytes=64 * MiB)) as (client, _app):
        head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="'.encode()
        body = Firehose(40 * MiB, head, fill=b"x")  # one part header tens of megabytes long
        response = await client.post("/v1/files", headers={**AUTH, "Content-Type": MULTIPART}, content=body)
        assert response.status_code == 400
        assert "header" in response.json()["error"]["message"]
        assert body.pulled <= 2 * MiB


async def test_json_bodies_elsewhere_stay_bounded_by_the_body_limit(
    make_settings: MakeSettings, app_client: AppClient
) -> None:
    async with app_client(settings_for(make_settings)) as (client, _app):
        body = Firehose(300 * MiB, b'{"prompt": "\\u00e9')
        response = await client.post(
            "/v1/completions", headers={**AUTH, "Content-Type": "application/json"}, content=body
        )
        assert response.status_code == 413
        assert body.pulled <= 3 * MiB
        assert body.growth_mib < 50


# ----- LOW: deeply nested JSON ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/generate", b'{"prompt": "\\u00e9", "x": ' + b"[" * 1000 + b"]" * 1000 + b"}"),
        ("/v1/completions", b'{"prompt": "\\u00e9", "x": ' + b"[" * 1000 + b"]" * 1000 + b"}"),
        ("/generate", b"[" * 100_000 + b"]" * 100_000),
        ("/v1/chat/completions", b"[" * 100_000 + b"]" * 100_000),
        ("/v1/completions", b'{"a":' * 100_000 + b"1" + b"}" * 100_000),
        ("/generate_background", b"[" * 100_000),  # not even valid JSON
    ],
)
async def test_deeply_nested_json_is_a_clear_400_not_a_500(
    make_settings: MakeSettings, app_client: AppClient, path: str, body: bytes
) -> None:
    async with app_client(settings_for(make_settings)) as (client, _app):
        response = await client.post(path, headers={**AUTH, "Content-Type": "application/json"}, content=body)
        assert response.status_code == 400, response.text
        assert "nested" in response.text and "deep" in response.text
        # The server still answers.
        assert (await client.get("/health")).status_code == 200


async def test_json_nested_within_the_limit_still_reaches_the_route(
    make_settings: MakeSettings, app_client: AppClient
) -> None:
    async with app_client(settings_for(make_settings)) as (client, _app):
        body = {"prompt": "caf\u00e9", "max_tokens": 2, "metadata": json.loads("[" * 40 + "]" * 40)}
        response = await client.post("/v1/completions", headers=AUTH, json={"model": "tiny", **body})
        assert response.status_code in (200, 400), response.text  # the route's own answer, not the depth check
        assert "nested" not in response.text
