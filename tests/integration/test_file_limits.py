"""Attacks on /v1/files and on request parsing: huge uploads, wrong content types, per-tenant quota,
file expiry and deeply nested JSON.

Bodies of hundreds of megabytes come from generators (never held in the test's memory); the app runs
in this process over ASGITransport, so the process's RSS is the server's.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import openai
import pytest

from tests.integration.test_batches import ALICE, BOB, batch_settings, completion_line, ended, jsonl, serve
from tests.support.waiting import wait_until
from textgen.batches.store import FileNotFoundInStoreError
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


def rss_bytes() -> int:
    """This process's resident memory (Linux), which is the server's: the app runs in-process."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Firehose:
    """A request body of ``total`` bytes, yielded 1 MiB at a time, each chunk a new bytes object (as a
    server receives them), so keeping them costs real memory; records how much the server pulled. The
    process's peak RSS meanwhile is sampled from a thread every few milliseconds (it sees a spike even
    while the event loop is busy joining a body)."""

    def __init__(self, total: int, head: bytes = b"", tail: bytes = b"", fill: bytes = LONG_LINE) -> None:
        self.total = total
        self.fill = fill
        self.head = head
        self.tail = tail
        self.pulled = 0
        self.start_rss = rss_bytes()
        self.peak_rss = self.start_rss
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak_rss = max(self.peak_rss, rss_bytes())

    async def __aiter__(self) -> AsyncIterator[bytes]:
        template = (self.fill * (MiB // len(self.fill) + 1))[:MiB]
        yield self._count(self.head)
        sent = 0
        while sent < self.total:
            size = min(MiB, self.total - sent)
            sent += size
            yield self._count(bytes(bytearray(template[:size])))  # a fresh object every time
        yield self._count(self.tail)

    def _count(self, data: bytes) -> bytes:
        self.pulled += len(data)
        return data

    @property
    def growth_mib(self) -> float:
        """Peak RSS growth so far; call after the response (it stops the sampler)."""
        self._stop.set()
        self._sampler.join()
        self.peak_rss = max(self.peak_rss, rss_bytes())
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


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "APPLICATION/JSON"])
async def test_deep_bodies_under_other_content_types_are_client_errors(
    make_settings: MakeSettings, app_client: AppClient, content_type: str
) -> None:
    async with app_client(settings_for(make_settings)) as (client, _app):
        for path in ("/generate", "/v1/completions", "/v1/batches"):
            body = b'{"prompt": "\\u00e9", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
            response = await client.post(path, headers={**AUTH, "Content-Type": content_type}, content=body)
            assert 400 <= response.status_code < 500, (path, response.status_code, response.text)


async def test_json_nested_within_the_limit_still_reaches_the_route(
    make_settings: MakeSettings, app_client: AppClient
) -> None:
    async with app_client(settings_for(make_settings)) as (client, _app):
        body = {"prompt": "caf\u00e9", "max_tokens": 2, "metadata": json.loads("[" * 40 + "]" * 40)}
        response = await client.post("/v1/completions", headers=AUTH, json={"model": "tiny", **body})
        assert response.status_code in (200, 400), response.text  # the route's own answer, not the depth check
        assert "nested" not in response.text


# ----- per-tenant quota ----------------------------------------------------------------------------------


async def test_the_file_count_quota_refuses_before_reading_and_is_per_tenant(make_settings: MakeSettings) -> None:
    settings = batch_settings(make_settings, files_max_per_tenant=2)
    async with serve(settings) as (app, client):
        alice, bob = client(ALICE), client(BOB)
        first = await alice.files.create(file=("a.jsonl", LINE), purpose="batch")
        await alice.files.create(file=("b.jsonl", LINE), purpose="batch")
        body = multipart_firehose(50 * MiB)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as http:
            refused = await http.post(
                "/v1/files", headers={"Authorization": f"Bearer {ALICE}", "Content-Type": MULTIPART}, content=body
            )
        assert refused.status_code == 413
        message = refused.json()["error"]["message"]
        assert "TEXTGEN_FILES_MAX_PER_TENANT" in message and "Delete files" in message
        assert body.pulled <= MiB  # refused before the upload was read
        assert (await bob.files.create(file=("c.jsonl", LINE), purpose="batch")).bytes == len(LINE)
        await alice.files.delete(first.id)
        assert (await alice.files.create(file=("d.jsonl", LINE), purpose="batch")).bytes == len(LINE)
        assert not [p for p in app.state.textgen.batches.files.root.iterdir() if p.name.startswith(".upload-")]


async def test_the_byte_quota_counts_while_reading_and_leaves_nothing_behind(make_settings: MakeSettings) -> None:
    settings = batch_settings(make_settings, files_max_bytes_per_tenant=10_000)
    async with serve(settings) as (app, client):
        alice = client(ALICE)
        kept = await alice.files.create(file=("a.jsonl", LINE * 100), purpose="batch")  # 7,700 bytes
        with pytest.raises(openai.APIStatusError) as over:
            await alice.files.create(file=("b.jsonl", LINE * 40), purpose="batch")
        assert over.value.status_code == 413
        assert "TEXTGEN_FILES_MAX_BYTES_PER_TENANT" in over.value.message
        assert sorted(p.name for p in app.state.textgen.batches.files.root.iterdir()) == [f"{kept.id}.jsonl"]
        assert (await alice.files.create(file=("c.jsonl", LINE * 29), purpose="batch")).bytes == len(LINE) * 29


# ----- expiry --------------------------------------------------------------------------------------------


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_expires_after_is_honoured_and_an_expired_file_is_gone(make_settings: MakeSettings) -> None:
    async with serve(batch_settings(make_settings)) as (app, client):
        batches = app.state.textgen.batches
        clock = batches.files.clock = Clock(1_800_000_000.0)
        alice = client(ALICE)
        hour = await alice.files.create(
            file=("a.jsonl", LINE), purpose="batch", expires_after={"anchor": "created_at", "seconds": 3600}
        )
        default = await alice.files.create(file=("b.jsonl", LINE), purpose="batch")
        assert hour.created_at == 1_800_000_000 and hour.expires_at == 1_800_000_000 + 3600
        assert default.expires_at == 1_800_000_000 + 30 * 86400  # TEXTGEN_FILES_EXPIRE_AFTER_S: OpenAI's 30 days
        assert (await alice.files.retrieve(hour.id)).expires_at == hour.expires_at

        clock.now += 3599
        assert (await alice.files.retrieve(hour.id)).id == hour.id
        clock.now += 1
        with pytest.raises(openai.NotFoundError):
            await alice.files.retrieve(hour.id)
        with pytest.raises(openai.NotFoundError):
            await alice.files.content(hour.id)
        with pytest.raises(openai.NotFoundError):
            await alice.batches.create(input_file_id=hour.id, endpoint="/v1/completions", completion_window="24h")
        assert [f.id for f in (await alice.files.list()).data] == [default.id]

        owner = (await batches.store.get_file(hour.id)).owner
        assert (await batches.store.file_usage(owner)).files == 2  # counted until swept
        assert await batches.coordinator.sweep_expired_files() == 1
        assert not batches.files.path(hour.id).exists()
        assert batches.files.path(default.id).exists()
        with pytest.raises(FileNotFoundInStoreError):
            await batches.store.get_file(hour.id)
        assert (await batches.store.file_usage(owner)).files == 1


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"expires_after[anchor]": "created_at", "expires_after[seconds]": "3599"}, "expires_after[seconds]"),
        ({"expires_after[anchor]": "created_at", "expires_after[seconds]": "2592001"}, "expires_after[seconds]"),
        ({"expires_after[anchor]": "created_at", "expires_after[seconds]": "1e4"}, "expires_after[seconds]"),
        ({"expires_after[anchor]": "last_active_at", "expires_after[seconds]": "3600"}, "expires_after[anchor]"),
    ],
)
async def test_expires_after_outside_openais_bounds_is_a_400_naming_it(
    make_settings: MakeSettings, app_client: AppClient, fields: dict[str, str], named: str
) -> None:
    async with app_client(settings_for(make_settings)) as (client, app):
        response = await upload(client, LINE, **fields)
        assert response.status_code == 400
        assert named in response.json()["error"]["message"]
        assert list(app.state.textgen.batches.files.root.iterdir()) == []


async def test_expires_after_without_an_anchor_means_created_at(
    make_settings: MakeSettings, app_client: AppClient
) -> None:
    """'created_at' is the only anchor there is, and the published schema makes neither field required."""
    async with app_client(settings_for(make_settings)) as (client, _):
        response = await upload(client, LINE, **{"expires_after[seconds]": "3600"})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["expires_at"] == body["created_at"] + 3600


async def test_the_coordinators_sweep_deletes_expired_files_on_its_own(make_settings: MakeSettings) -> None:
    settings = batch_settings(make_settings, files_sweep_interval_s=0.05)
    async with serve(settings) as (app, client):
        batches = app.state.textgen.batches
        clock = batches.files.clock = Clock(1_800_000_000.0)
        alice = client(ALICE)
        short = await alice.files.create(
            file=("a.jsonl", LINE), purpose="batch", expires_after={"anchor": "created_at", "seconds": 3600}
        )
        path = batches.files.path(short.id)
        owner = (await batches.store.get_file(short.id)).owner
        assert path.exists()
        clock.now += 3600
        await wait_until(lambda: not path.exists(), what="the sweep deleting the expired file")
        assert (await batches.store.file_usage(owner)).files == 0


async def test_batch_outputs_expire_by_default_and_a_batch_keeps_its_input(make_settings: MakeSettings) -> None:
    async with serve(batch_settings(make_settings)) as (_app, client):
        alice = client(ALICE)
        uploaded = await alice.files.create(
            file=("in.jsonl", jsonl([completion_line("one")])),
            purpose="batch",
            expires_after={"anchor": "created_at", "seconds": 3600},
        )
        batch = await alice.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h"
        )
        kept = await alice.files.retrieve(uploaded.id)
        assert kept.expires_at is not None and kept.expires_at >= batch.expires_at + 3600  # outlives the window
        done = await ended(alice, batch.id)
        assert done.status == "completed" and done.output_file_id is not None
        output = await alice.files.retrieve(done.output_file_id)
        assert output.expires_at == output.created_at + 30 * 86400  # TEXTGEN_BATCH_OUTPUT_EXPIRE_AFTER_S
