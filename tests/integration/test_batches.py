"""The OpenAI Batch API through the official ``openai`` client (in-process, tiny GPT-2, SQLite).

The client's batch workflow runs unchanged: files.create -> batches.create -> poll batches.retrieve ->
files.content. Every output line is checked by ``parse_batch_output``, a reference parser of OpenAI's
batch output format that validates each response body with the ``openai`` package's own models. Also:
all-or-nothing validation, cancel, expiry, two tenants, file limits and the completion webhook.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI
from openai import AsyncOpenAI
from openai.types import Batch

from main import create_app
from tests.support.batch_files import chat_line, completion_line, jsonl, parse_batch_output
from tests.support.waiting import wait_until
from tests.support.webhooks import WebhookReceiver
from textgen.config import Settings
from textgen.jobs.store import JobState
from textgen.webhooks import SIGNATURE_HEADER, verify
from textgen.workers import coordinator

MakeSettings = Callable[..., Settings]
ALICE, BOB = "alice-key", "bob-key"
ENDED = {"completed", "failed", "cancelled", "expired"}


@asynccontextmanager
async def serve(settings: Settings) -> AsyncIterator[tuple[FastAPI, Callable[[str], AsyncOpenAI]]]:
    """The app with its lifespan, and a factory of official clients (one per API key) talking to it."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver", timeout=60)
        async with http:

            def client(key: str) -> AsyncOpenAI:
                return AsyncOpenAI(base_url="http://testserver/v1", api_key=key, http_client=http, max_retries=0)

            yield app, client


def batch_settings(make_settings: MakeSettings, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"api_keys": f"{ALICE},{BOB}", "batch_poll_interval_s": 0.05, "job_concurrency": 4}
    return make_settings(**{**values, **overrides})


async def wait_for_batch(client: AsyncOpenAI, batch_id: str, done: Callable[[Batch], bool], timeout_s: float) -> Batch:
    last: list[Batch] = []

    async def there() -> bool:
        last[:] = [await client.batches.retrieve(batch_id)]
        return done(last[0])

    try:
        await wait_until(there, timeout_s, "the batch", interval_s=0.05)
    except AssertionError:
        pytest.fail(f"batch did not get there within {timeout_s:.0f} s: {last[0].status} {last[0].request_counts}")
    return last[0]


async def ended(client: AsyncOpenAI, batch_id: str, timeout_s: float = 60) -> Batch:
    return await wait_for_batch(client, batch_id, lambda b: b.status in ENDED, timeout_s)


async def run_batch(client: AsyncOpenAI, lines: list[dict[str, Any]], endpoint: str, **create: Any) -> Batch:
    uploaded = await client.files.create(file=("requests.jsonl", jsonl(lines)), purpose="batch")
    batch = await client.batches.create(
        input_file_id=uploaded.id, endpoint=endpoint, completion_window=create.pop("window", "24h"), **create
    )
    assert batch.status == "validating"
    return batch


async def content(client: AsyncOpenAI, file_id: str | None) -> bytes:
    if file_id is None:
        return b""
    return (await client.files.content(file_id)).read()


# ----- the workflow ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
async def test_the_official_client_batch_workflow(make_settings: MakeSettings, endpoint: str) -> None:
    make_line = completion_line if endpoint == "/v1/completions" else chat_line
    lines = [make_line(f"request-{i}") for i in range(12)]
    async with serve(batch_settings(make_settings)) as (_app, client):
        oai = client(ALICE)
        batch = await run_batch(oai, lines, endpoint, metadata={"job": "nightly"})
        seen: set[str] = set()

        def finished(b: Batch) -> bool:
            seen.add(b.status)
            return b.status in ENDED

        done = await wait_for_batch(oai, batch.id, finished, 60)
        assert done.status == "completed", done.errors
        assert seen <= {"validating", "in_progress", "finalizing", "completed"}
        assert done.request_counts is not None
        assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (12, 12, 0)
        assert done.metadata == {"job": "nightly"}
        assert done.in_progress_at and done.finalizing_at and done.completed_at
        assert done.created_at <= done.in_progress_at <= done.finalizing_at <= done.completed_at
        assert done.error_file_id is None and done.output_file_id is not None
        records = parse_batch_output(await content(oai, done.output_file_id), endpoint)
        assert sorted(records) == sorted(line["custom_id"] for line in lines)
        assert {r["response"]["status_code"] for r in records.values()} == {200}
        output = await oai.files.retrieve(done.output_file_id)
        assert output.purpose == "batch_output" and output.bytes > 0
        listed = await oai.batches.list()
        assert [b.id for b in listed.data] == [batch.id]


async def test_paging_through_small_pieces_answers_every_line(
    make_settings: MakeSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lines are read, submitted, scanned and written in bounded pieces (that is what keeps memory flat):
    with pieces of 4 lines and outcome scans of 3, a 25-line batch still answers every line once."""
    monkeypatch.setattr(coordinator, "READ_CHUNK_LINES", 4)
    monkeypatch.setattr(coordinator, "SCAN_LIMIT", 3)
    lines = [completion_line(f"r{i}") for i in range(25)]
    async with serve(batch_settings(make_settings, job_concurrency=8)) as (_app, client):
        oai = client(ALICE)
        done = await ended(oai, (await run_batch(oai, lines, "/v1/completions")).id)
        assert done.status == "completed" and done.request_counts is not None
        assert (done.request_counts.completed, done.request_counts.failed) == (25, 0)
        records = parse_batch_output(await content(oai, done.output_file_id), "/v1/completions")
        assert sorted(records) == sorted(line["custom_id"] for line in lines)


async def test_a_line_the_model_refuses_is_answered_in_the_error_file(make_settings: MakeSettings) -> None:
    lines = [completion_line("fine"), completion_line("hateful", prompt="I hate this"), completion_line("fine-too")]
    async with serve(batch_settings(make_settings)) as (_app, client):
        oai = client(ALICE)
        done = await ended(oai, (await run_batch(oai, lines, "/v1/completions")).id)
        assert done.status == "completed"
        assert done.request_counts is not None and (done.request_counts.completed, done.request_counts.failed) == (2, 1)
        good = parse_batch_output(await content(oai, done.output_file_id), "/v1/completions")
        bad = parse_batch_output(await content(oai, done.error_file_id), "/v1/completions")
        assert sorted(good) == ["fine", "fine-too"] and list(bad) == ["hateful"]
        assert bad["hateful"]["response"]["status_code"] == 400
        assert "content filter" in bad["hateful"]["response"]["body"]["error"]["message"]


# ----- validation: all or nothing --------------------------------------------------------------------------


async def test_an_invalid_file_fails_the_whole_batch_naming_every_bad_line(make_settings: MakeSettings) -> None:
    good = [json.dumps(completion_line(f"ok-{i}")).encode() for i in range(3)]
    raw = [
        good[0],
        b'{"custom_id": "broken", "method": "POST",',  # line 2: not JSON
        good[1],
        json.dumps(completion_line("ok-0")).encode(),  # line 4: duplicate custom_id
        json.dumps({**completion_line("wrong-url"), "url": "/v1/chat/completions"}).encode(),  # line 5
        json.dumps(completion_line("too-long", prompt="x" * 600)).encode(),  # line 6: over 512 bytes
        json.dumps(completion_line("bad-body", max_tokens=-1)).encode(),  # line 7
        good[2],
    ]
    settings = batch_settings(make_settings, batch_max_line_bytes=512)
    async with serve(settings) as (app, client):
        oai = client(ALICE)
        uploaded = await oai.files.create(file=("bad.jsonl", b"\n".join(raw) + b"\n"), purpose="batch")
        batch = await oai.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h")
        done = await ended(oai, batch.id)
        assert done.status == "failed" and done.failed_at is not None
        assert done.errors is not None and done.errors.data is not None
        by_line = {error.line: error.code for error in done.errors.data}
        assert by_line == {
            2: "invalid_json_line",
            4: "duplicate_custom_id",
            5: "mismatched_url",
            6: "line_too_long",
            7: "invalid_body",
        }
        assert "TEXTGEN_BATCH_MAX_LINE_BYTES" in next(e.message for e in done.errors.data if e.line == 6)
        assert done.output_file_id is None and done.error_file_id is None
        # Nothing ran: not one job was created for the valid lines.
        assert await app.state.textgen.store.list(limit=10) == []


# ----- cancel and expiry -----------------------------------------------------------------------------------


SLOW = {"max_tokens": 200, "ignore_eos": True}


async def assert_every_line_answered_once(oai: AsyncOpenAI, done: Batch, custom_ids: list[str]) -> tuple[dict, dict]:
    good = parse_batch_output(await content(oai, done.output_file_id), "/v1/completions")
    bad = parse_batch_output(await content(oai, done.error_file_id), "/v1/completions")
    assert not set(good) & set(bad)
    assert sorted([*good, *bad]) == sorted(custom_ids)
    return good, bad


async def test_cancel_stops_queued_lines_at_once_and_lets_running_ones_finish(make_settings: MakeSettings) -> None:
    custom_ids = [f"line-{i}" for i in range(30)]
    settings = batch_settings(make_settings, job_concurrency=1)
    async with serve(settings) as (app, client):
        oai = client(ALICE)
        batch = await run_batch(oai, [completion_line(c, **SLOW) for c in custom_ids], "/v1/completions")
        await wait_for_batch(oai, batch.id, lambda b: b.status == "in_progress", 30)
        store = app.state.textgen.store

        async def a_line_running() -> bool:
            return await store.count(JobState.RUNNING) > 0

        await wait_until(a_line_running, 30, "a line starting")
        cancelling = await oai.batches.cancel(batch.id)
        assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
        done = await ended(oai, batch.id)
        assert done.status == "cancelled" and done.cancelled_at is not None
        assert await store.count(JobState.QUEUED) == 0
        good, bad = await assert_every_line_answered_once(oai, done, custom_ids)
        assert 1 <= len(good) <= 3, "the running line finishes; the queued ones never run"
        assert {r["error"]["code"] for r in bad.values()} == {"batch_cancelled"}
        with pytest.raises(openai.ConflictError):
            await oai.batches.cancel(batch.id)


async def test_a_batch_past_its_window_expires_keeping_what_finished(make_settings: MakeSettings) -> None:
    custom_ids = [f"line-{i}" for i in range(60)]
    settings = batch_settings(make_settings, job_concurrency=1)
    async with serve(settings) as (_app, client):
        oai = client(ALICE)
        batch = await run_batch(oai, [completion_line(c, **SLOW) for c in custom_ids], "/v1/completions", window="2s")
        assert batch.expires_at is not None and batch.expires_at - batch.created_at == 2
        done = await ended(oai, batch.id)
        assert done.status == "expired" and done.expired_at is not None
        good, bad = await assert_every_line_answered_once(oai, done, custom_ids)
        assert good, "lines that finished inside the window are kept"
        assert {r["error"]["code"] for r in bad.values()} == {"batch_expired"}
        assert done.request_counts is not None and done.request_counts.completed == len(good)


# ----- tenants ---------------------------------------------------------------------------------------------


async def test_another_key_cannot_see_or_touch_files_and_batches(make_settings: MakeSettings) -> None:
    async with serve(batch_settings(make_settings)) as (_app, client):
        alice, bob = client(ALICE), client(BOB)
        batch = await run_batch(alice, [completion_line("a")], "/v1/completions")
        done = await ended(alice, batch.id)
        file_ids = [batch.input_file_id, done.output_file_id]
        for file_id in file_ids:
            assert file_id is not None
            with pytest.raises(openai.NotFoundError):
                await bob.files.retrieve(file_id)
            with pytest.raises(openai.NotFoundError):
                await bob.files.content(file_id)
            with pytest.raises(openai.NotFoundError):
                await bob.files.delete(file_id)
        with pytest.raises(openai.NotFoundError):
            await bob.batches.retrieve(batch.id)
        with pytest.raises(openai.NotFoundError):
            await bob.batches.cancel(batch.id)
        with pytest.raises(openai.NotFoundError):
            await bob.batches.create(
                input_file_id=batch.input_file_id, endpoint="/v1/completions", completion_window="24h"
            )
        assert (await bob.batches.list()).data == [] and (await bob.files.list()).data == []
        assert [b.id for b in (await alice.batches.list()).data] == [batch.id]
        assert {f.id for f in (await alice.files.list()).data} == set(file_ids)
        assert (await alice.files.retrieve(batch.input_file_id)).id == batch.input_file_id


# ----- files -----------------------------------------------------------------------------------------------


async def test_files_round_trip_and_delete(make_settings: MakeSettings) -> None:
    data = jsonl([completion_line(f"r{i}") for i in range(5)])
    async with serve(batch_settings(make_settings)) as (_app, client):
        oai = client(ALICE)
        uploaded = await oai.files.create(file=("in.jsonl", data), purpose="batch")
        assert (uploaded.object, uploaded.bytes, uploaded.filename, uploaded.purpose) == (
            "file",
            len(data),
            "in.jsonl",
            "batch",
        )
        assert uploaded.id.startswith("file-")
        assert await content(oai, uploaded.id) == data
        deleted = await oai.files.delete(uploaded.id)
        assert deleted.deleted and deleted.id == uploaded.id
        with pytest.raises(openai.NotFoundError):
            await oai.files.retrieve(uploaded.id)


async def test_file_limits_are_named_in_the_refusal(make_settings: MakeSettings) -> None:
    settings = batch_settings(make_settings, batch_max_file_bytes=4096, batch_max_lines=10)
    async with serve(settings) as (app, client):
        oai = client(ALICE)
        with pytest.raises(openai.APIStatusError) as too_big:
            await oai.files.create(file=("big.jsonl", b"x" * 5000 + b"\n"), purpose="batch")
        assert too_big.value.status_code == 413 and "TEXTGEN_BATCH_MAX_FILE_BYTES" in too_big.value.message
        with pytest.raises(openai.BadRequestError) as too_many:
            await oai.files.create(file=("many.jsonl", b"{}\n" * 11), purpose="batch")
        assert "TEXTGEN_BATCH_MAX_LINES" in too_many.value.message
        with pytest.raises(openai.BadRequestError) as no_newline:
            await oai.files.create(file=("many.jsonl", b"{}\n" * 10 + b"{}"), purpose="batch")
        assert "TEXTGEN_BATCH_MAX_LINES" in no_newline.value.message
        with pytest.raises(openai.BadRequestError) as purpose:
            await oai.files.create(file=("x.jsonl", b"{}\n"), purpose="fine-tune")
        assert "purpose" in purpose.value.message
        exactly = await oai.files.create(file=("ok.jsonl", b"{}\n" * 10), purpose="batch")
        assert exactly.bytes == 30
        # Refused uploads leave nothing behind on disk.
        files_dir = app.state.textgen.batches.files.root
        assert sorted(p.name for p in files_dir.iterdir()) == [f"{exactly.id}.jsonl"]


# ----- webhook ---------------------------------------------------------------------------------------------


async def test_a_finished_batch_is_posted_to_its_callback_url_signed(make_settings: MakeSettings) -> None:
    secret = "batch-secret"
    settings = batch_settings(make_settings, webhook_secret=secret, webhook_allow_private=True)
    with WebhookReceiver() as receiver:
        async with serve(settings) as (_app, client):
            oai = client(ALICE)
            metadata = {"callback_url": receiver.url()}
            batch = await run_batch(
                oai, [completion_line("a"), completion_line("b")], "/v1/completions", metadata=metadata
            )
            await ended(oai, batch.id)
            await wait_until(lambda: bool(receiver.posts()), 20, "the batch's webhook")
            # A later batch's webhook delivered: the coordinator has made passes since, and a second delivery
            # of the first batch's would have been sent by then.
            later = await run_batch(oai, [completion_line("c")], "/v1/completions", metadata=metadata)
            await ended(oai, later.id)
            await wait_until(lambda: len(receiver.posts()) >= 2, 20, "the later batch's webhook")
        posts = [p for p in receiver.posts() if p.json()["batch"]["id"] == batch.id]
        assert len(posts) == 1
        assert verify(secret, posts[0].body, posts[0].headers[SIGNATURE_HEADER])
        body = posts[0].json()
        assert body["event"] == "batch.completed" and body["batch"]["id"] == batch.id
        assert body["batch"]["request_counts"] == {"total": 2, "completed": 2, "failed": 0}
