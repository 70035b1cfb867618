"""Rate limits over HTTP (issue 20): batch lines are charged to their owner and paced, every API route
counts against TEXTGEN_RATE_LIMIT_RPM, prompt tokens count against TEXTGEN_RATE_LIMIT_TPM, and a
request without an output limit is served under a small TPM.

The limiter's clock is replaced by a fake one that the tests move to the next window: nothing waits
for a minute to pass. Batch tests run on the SQLite and the Redis store.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from typing import Any

import httpx
import pytest
import redis
from fastapi import FastAPI

from tests.integration.test_tenants import prompt_tokens
from tests.support.redis import RedisServer
from tests.support.waiting import wait_until
from textgen.access import owner_id_for_key
from textgen.batches.store import Batch, BatchStatus
from textgen.ratelimit import (
    WINDOW_S,
    RedisRateLimiter,
    Reservation,
    SQLiteRateLimiter,
    WindowedRateLimiter,
    key_digest,
)

MakeSettings = Callable[..., Any]
AppClient = Callable[..., Any]

ALICE = {"Authorization": "Bearer alice-key"}
BOB = {"Authorization": "Bearer bob-key"}
ALICE_RATE_KEY = owner_id_for_key("alice-key")
PROMPT = "The future of AI is"
LINE_OUTPUT = 8


class FakeClock:
    """A clock standing one second into a window; ``next_window`` moves it a whole window on."""

    def __init__(self) -> None:
        self.now = (time.time() // WINDOW_S) * WINDOW_S + 1.0

    def __call__(self) -> float:
        return self.now

    def next_window(self) -> None:
        self.now += WINDOW_S


@pytest.fixture(params=["sqlite", "redis"])
def job_store(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """The job store URL for the test (None: the default SQLite file in tmp_path)."""
    if request.param == "sqlite":
        yield None
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    yield server.url(0)
    with closing(redis.Redis.from_url(server.url(0))) as raw:
        raw.flushdb()  # the next test on this server starts from nothing (jobs, batches, counts)


def limiter_of(app: FastAPI) -> WindowedRateLimiter:
    limiter = app.state.textgen.service.rate_limiter
    assert isinstance(limiter, WindowedRateLimiter)
    return limiter


def fake_clock(app: FastAPI) -> FakeClock:
    clock = FakeClock()
    limiter_of(app).clock = clock
    return clock


def counted(app: FastAPI, rate_key: str) -> tuple[int, int]:
    """(requests, tokens) the limiter holds for ``rate_key`` in its clock's current window, read from the
    store itself."""
    limiter = limiter_of(app)
    window, digest = int(limiter.clock() // WINDOW_S), key_digest(rate_key)
    if isinstance(limiter, SQLiteRateLimiter):
        with closing(sqlite3.connect(limiter.path)) as conn:
            row = conn.execute(
                "SELECT requests, tokens FROM rate_limits WHERE key_hash = ? AND win = ?", (digest, window)
            ).fetchone()
        return (0, 0) if row is None else (int(row[0]), int(row[1]))
    assert isinstance(limiter, RedisRateLimiter)
    with closing(redis.Redis.from_url(app.state.textgen.settings.job_store)) as raw:
        values = raw.hmget(f"{limiter.prefix}:ratelimit:{digest}:{window}", "requests", "tokens")
    return int(values[0] or 0), int(values[1] or 0)


def line(custom_id: str, **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/completions",
        "body": {"model": "tiny", "prompt": PROMPT, "max_tokens": LINE_OUTPUT, "ignore_eos": True, **body},
    }


async def start_batch(client: httpx.AsyncClient, lines: list[dict[str, Any]]) -> str:
    data = b"".join(json.dumps(item).encode() + b"\n" for item in lines)
    upload = await client.post(
        "/v1/files", files={"file": ("in.jsonl", data)}, data={"purpose": "batch"}, headers=ALICE
    )
    assert upload.status_code == 200, upload.text
    body = {"input_file_id": upload.json()["id"], "endpoint": "/v1/completions", "completion_window": "24h"}
    created = await client.post("/v1/batches", json=body, headers=ALICE)
    assert created.status_code == 200, created.text
    return str(created.json()["id"])


async def stored_batch(app: FastAPI, batch_id: str) -> Batch:
    batch: Batch = await app.state.textgen.batches.store.get_batch(batch_id)
    return batch


async def settled(app: FastAPI, batch_id: str, after_line: int = 0) -> Batch:
    """The batch once it is completed, or paced past line ``after_line`` with every submitted line
    finished."""
    store = app.state.textgen.batches.store
    jobs = app.state.textgen.store
    latest: list[Batch] = []

    async def quiet() -> bool:
        batch = await store.get_batch(batch_id)
        latest[:] = [batch]
        if batch.status is BatchStatus.COMPLETED:
            return True
        if not batch.paced or batch.submit_line <= after_line:
            return False
        open_jobs = [job_id for _, job_id in await store.open_lines(batch_id, 0, 1000)]
        states = await jobs.states(open_jobs)
        return all(state.value in ("succeeded", "failed", "cancelled") for state in states.values())

    await wait_until(quiet, 60, "the batch to finish its window's lines")
    return latest[0]


# ----- batches --------------------------------------------------------------------------------------------


async def test_a_batch_over_the_token_budget_is_paced_and_charged_to_its_owner(
    make_settings: MakeSettings, app_client: AppClient, job_store: str | None
) -> None:
    per_line = prompt_tokens(PROMPT) + LINE_OUTPUT  # what one line reserves and uses (ignore_eos)
    tpm = 3 * per_line + 4  # three lines a window, and 4 tokens to spare
    settings = make_settings(
        api_keys=["alice-key", "bob-key"],
        rate_limit_tpm=tpm,
        rate_limit_rpm=1000,
        batch_poll_interval_s=0.05,
        job_concurrency=4,
        **({"job_store": job_store} if job_store else {}),
    )
    async with app_client(settings) as (client, app):
        clock = fake_clock(app)
        batch_id = await start_batch(client, [line(f"r{i}") for i in range(8)])
        submitted_per_window = []
        for window in range(3):
            batch = await settled(app, batch_id, sum(submitted_per_window))
            submitted_per_window.append(batch.submit_line - sum(submitted_per_window))
            requests, tokens = counted(app, ALICE_RATE_KEY)
            # Every line submitted in this window is one request and its prompt + output tokens.
            assert tokens == submitted_per_window[-1] * per_line
            if window == 0:
                assert requests == 2 + 3  # the upload, the create, three lines
                assert batch.status is BatchStatus.IN_PROGRESS and batch.paced
                # The owner's own next request sees the budget the batch used (4 tokens are left) ...
                direct = await client.post(
                    "/generate", json={"prompt": PROMPT, "max_new_tokens": LINE_OUTPUT}, headers=ALICE
                )
                assert direct.status_code == 429 and "TEXTGEN_RATE_LIMIT_TPM" in direct.text
                assert int(direct.headers["Retry-After"]) >= 1
                # ... while another key's budget is its own.
                other = await client.post(
                    "/generate", json={"prompt": PROMPT, "max_new_tokens": LINE_OUTPUT}, headers=BOB
                )
                assert other.status_code == 200
            if batch.status is BatchStatus.COMPLETED:
                break
            clock.next_window()
        assert submitted_per_window == [3, 3, 2]
        done = await stored_batch(app, batch_id)
        assert done.status is BatchStatus.COMPLETED and (done.completed, done.failed) == (8, 0)
        output = await client.get(f"/v1/files/{done.output_file_id}/content", headers=ALICE)
        usages = [json.loads(row)["response"]["body"]["usage"] for row in output.text.splitlines()]
        assert [u["total_tokens"] for u in usages] == [per_line] * 8


async def test_batch_lines_count_against_the_owners_request_limit(
    make_settings: MakeSettings, app_client: AppClient
) -> None:
    settings = make_settings(
        api_keys=["alice-key", "bob-key"], rate_limit_rpm=5, batch_poll_interval_s=0.05, job_concurrency=4
    )
    async with app_client(settings) as (client, app):
        clock = fake_clock(app)
        batch_id = await start_batch(client, [line(f"r{i}") for i in range(5)])  # 2 requests so far
        batch = await settled(app, batch_id)
        assert batch.submit_line == 3 and batch.paced  # three lines fill the five requests
        assert counted(app, ALICE_RATE_KEY) == (5, 0)
        clock.next_window()
        done = await settled(app, batch_id, 3)
        assert done.status is BatchStatus.COMPLETED and done.completed == 5
        assert counted(app, ALICE_RATE_KEY) == (2, 0)


async def test_a_line_that_could_never_fit_fails_alone(make_settings: MakeSettings, app_client: AppClient) -> None:
    per_line = prompt_tokens(PROMPT) + LINE_OUTPUT
    settings = make_settings(api_keys=["alice-key", "bob-key"], rate_limit_tpm=2 * per_line, batch_poll_interval_s=0.05)
    async with app_client(settings) as (client, app):
        fake_clock(app)
        batch_id = await start_batch(client, [line("small"), line("huge", max_tokens=4 * per_line), line("small-2")])
        done = await settled(app, batch_id)
        assert done.status is BatchStatus.COMPLETED and (done.completed, done.failed) == (2, 1)
        errors = await client.get(f"/v1/files/{done.error_file_id}/content", headers=ALICE)
        record = json.loads(errors.text)
        assert record["custom_id"] == "huge" and record["response"]["status_code"] == 429
        assert "can never run" in record["response"]["body"]["error"]["message"]


async def test_a_chat_line_without_max_tokens_runs_under_a_small_token_limit(
    make_settings: MakeSettings, app_client: AppClient
) -> None:
    settings = make_settings(api_keys=["alice-key", "bob-key"], rate_limit_tpm=60, batch_poll_interval_s=0.05)
    chat = {
        "custom_id": "chat",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "ignore_eos": True},
    }
    async with app_client(settings) as (client, app):
        fake_clock(app)
        data = json.dumps(chat).encode() + b"\n"
        upload = await client.post(
            "/v1/files", files={"file": ("in.jsonl", data)}, data={"purpose": "batch"}, headers=ALICE
        )
        body = {"input_file_id": upload.json()["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}
        batch_id = (await client.post("/v1/batches", json=body, headers=ALICE)).json()["id"]
        done = await settled(app, batch_id)
        assert done.status is BatchStatus.COMPLETED and done.completed == 1
        output = await client.get(f"/v1/files/{done.output_file_id}/content", headers=ALICE)
        usage = json.loads(output.text)["response"]["body"]["usage"]
        assert usage["total_tokens"] == 60  # granted exactly what one window allows
        assert counted(app, ALICE_RATE_KEY)[1] == 60


# ----- every route counts against the request limit --------------------------------------------------------

PROBES = {"/health", "/ready", "/metrics"}


async def test_every_api_route_counts_against_the_request_limit(
    make_settings: MakeSettings, app_client: AppClient
) -> None:
    """Each documented route and method, called twice in one window with RPM=1: the second call is a 429
    (whatever the first answered: a 404 or a 422 is counted too). The probes never are."""
    settings = make_settings(api_keys=["alice-key", "bob-key"], rate_limit_rpm=1)
    async with app_client(settings) as (client, app):
        clock = fake_clock(app)
        paths = app.openapi()["paths"]
        undocumented = [
            (method, path)
            for path, item in paths.items()
            for method, operation in item.items()
            if path not in PROBES and "429" not in operation["responses"]
        ]
        assert not undocumented  # every counted route says it may answer 429
        routes = [
            (method.upper(), path.replace("{", "x").replace("}", "")) for path, item in paths.items() for method in item
        ]
        assert {path for _, path in routes} >= {"/v1/models", "/v1/files", "/v1/batches", "/stats", "/jobs"}
        for method, path in routes:
            clock.next_window()
            # An upload that is not multipart is refused unread before routing (415), so send a real one.
            upload = {"files": {"file": ("a.jsonl", b"{}")}, "data": {"purpose": "batch"}}
            extra: dict[str, Any] = upload if (method, path) == ("POST", "/v1/files") else {}
            statuses = [(await client.request(method, path, headers=ALICE, **extra)).status_code for _ in range(2)]
            if path in PROBES:
                assert 429 not in statuses, (method, path, statuses)
            else:
                assert statuses[0] != 429 and statuses[1] == 429, (method, path, statuses)
        clock.next_window()
        for path in sorted(PROBES):
            assert [(await client.get(path, headers=ALICE)).status_code for _ in range(3)] == [200] * 3
        assert counted(app, ALICE_RATE_KEY) == (0, 0)  # the probes counted nothing


# ----- tokens per minute: prompts, and requests without an output limit -------------------------------------


async def test_prompt_tokens_are_charged(make_settings: MakeSettings, app_client: AppClient) -> None:
    long_prompt = "The future of AI is " * 40
    tokens = prompt_tokens(long_prompt)
    assert tokens > 200
    async with app_client(make_settings(rate_limit_tpm=100_000)) as (client, app):
        fake_clock(app)
        body = {"model": "tiny", "prompt": [long_prompt] * 4, "max_tokens": 1, "ignore_eos": True}
        response = await client.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        usage = response.json()["usage"]
        assert usage["prompt_tokens"] == 4 * tokens
        # What the limiter holds is what usage reports: prompts and output (after the refund settled).
        await wait_until(lambda: counted(app, "client:127.0.0.1")[1] == usage["total_tokens"], 10, "the refund")


async def test_a_prompt_alone_over_the_token_limit_is_refused_naming_the_fix(
    make_settings: MakeSettings, app_client: AppClient
) -> None:
    long_prompt = "The future of AI is " * 40
    async with app_client(make_settings(rate_limit_tpm=100)) as (client, _app):
        for body in (
            {"model": "tiny", "messages": [{"role": "user", "content": long_prompt}]},
            {"model": "tiny", "messages": [{"role": "user", "content": long_prompt}], "max_tokens": 5},
        ):
            refused = await client.post("/v1/chat/completions", json=body)
            assert refused.status_code == 429
            message = refused.json()["error"]["message"]
            assert "can never run" in message and "shorter prompt" in message and "TEXTGEN_RATE_LIMIT_TPM" in message


async def test_chat_without_max_tokens_is_served_under_a_small_token_limit(
    make_settings: MakeSettings, app_client: AppClient
) -> None:
    """TPM far below TEXTGEN_MAX_NEW_TOKENS_LIMIT (1024): a chat that names no max_tokens is granted what
    the window holds instead of a 429 it could never get past."""
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "ignore_eos": True}
    async with app_client(make_settings(rate_limit_tpm=300)) as (client, app):
        clock = fake_clock(app)
        first = await client.post("/v1/chat/completions", json=chat)
        assert first.status_code == 200, first.text
        assert first.json()["usage"]["total_tokens"] == 300  # the whole window, no more
        assert first.json()["choices"][0]["finish_reason"] == "length"
        refused = await client.post("/v1/chat/completions", json=chat)
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
        clock.next_window()
        # A window partly spent: an explicit request takes 200, the open-ended one gets what is left.
        explicit = await client.post("/v1/chat/completions", json={**chat, "max_tokens": 200 - first_prompt(first)})
        assert explicit.status_code == 200 and explicit.json()["usage"]["total_tokens"] == 200
        rest = await client.post("/v1/chat/completions", json=chat)
        assert rest.status_code == 200 and rest.json()["usage"]["total_tokens"] == 100
        assert counted(app, "client:127.0.0.1")[1] == 300


def first_prompt(response: httpx.Response) -> int:
    return int(response.json()["usage"]["prompt_tokens"])


async def test_a_paced_batch_is_still_charged_to_its_owner_after_a_restart(
    make_settings: MakeSettings, app_client: AppClient, job_store: str | None
) -> None:
    """The owner's key is stored with the batch and each line's reservation with its job: a new process
    picks the paced batch up where it stopped and charges the remaining lines to the same key."""
    per_line = prompt_tokens(PROMPT) + LINE_OUTPUT
    settings = make_settings(
        api_keys=["alice-key", "bob-key"],
        rate_limit_tpm=3 * per_line,
        batch_poll_interval_s=0.05,
        **({"job_store": job_store} if job_store else {}),
    )
    async with app_client(settings) as (client, app):
        first_clock = fake_clock(app)
        batch_id = await start_batch(client, [line(f"r{i}") for i in range(7)])
        batch = await settled(app, batch_id)
        assert (batch.submit_line, batch.paced, batch.rate_key) == (3, True, ALICE_RATE_KEY)
    async with app_client(settings) as (client, app):
        clock = fake_clock(app)
        clock.now = first_clock.now  # the same minute: still spent after the restart
        await wait_until(lambda: app.state.textgen.runner.polls > 2, 10, "the new process to poll")
        assert (await stored_batch(app, batch_id)).submit_line == 3
        submitted = [3]
        while True:
            clock.next_window()
            batch = await settled(app, batch_id, sum(submitted))
            submitted.append(batch.submit_line - sum(submitted))
            assert counted(app, ALICE_RATE_KEY)[1] == submitted[-1] * per_line
            if batch.status is BatchStatus.COMPLETED:
                break
        assert submitted == [3, 3, 1] and batch.completed == 7
        for _number, job_id in [
            (line.number, line.job_id) for line in await app.state.textgen.batches.store.lines(batch_id, 0, 10)
        ]:
            job = await app.state.textgen.store.get(job_id)
            reservation = Reservation.decode(job.reservation)
            assert reservation is not None and reservation.digest == key_digest(ALICE_RATE_KEY)
            assert reservation.tokens == per_line and reservation.prompt_tokens == prompt_tokens(PROMPT)
