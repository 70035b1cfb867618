"""Tenants over HTTP: every job, stream and limit belongs to the key (or client) that made it.

Two keys (Alice, Bob) and an admin key, on the SQLite and the Redis job store: every cross-tenant read,
listing, stream, cancel and Idempotency-Key reuse fails as if the job did not exist. Token budgets are
reserved before any work and hold under concurrency, early hang-ups and background jobs. The client
address behind X-Forwarded-For is believed only from a trusted proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.integration.test_jobs import TERMINAL, assert_error
from tests.integration.test_streaming import sse_events, streaming_client
from tests.support.redis import RedisServer
from tests.support.tiny_model import build_tokenizer
from tests.support.waiting import wait_until

MakeSettings = Callable[..., Any]
AppClient = Callable[..., Any]

ALICE = {"Authorization": "Bearer alice-key"}
BOB = {"Authorization": "Bearer bob-key"}
ADMIN = {"Authorization": "Bearer admin-key"}
JOB = {"prompt": "The future of AI is", "max_new_tokens": 2}
_TOKENIZER = build_tokenizer()  # the tiny model's tokenizer


def prompt_tokens(text: str) -> int:
    """What TEXTGEN_RATE_LIMIT_TPM charges for a prompt (the tiny model's tokens, as the engine counts)."""
    return len(_TOKENIZER(text, add_special_tokens=True).input_ids)


FUTURE = prompt_tokens("The future of AI is")
HI = prompt_tokens("Hi")


@pytest.fixture(params=["sqlite", "redis"])
def job_store(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """The job store URL for the test (None: the default SQLite file in tmp_path)."""
    if request.param == "sqlite":
        yield None
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    yield server.url(0)
    import redis

    with redis.Redis.from_url(server.url(0)) as raw:
        raw.flushdb()


class _Collect(logging.Handler):
    def __init__(self, into: list[str]) -> None:
        super().__init__(logging.DEBUG)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(self.format(record))


@pytest.fixture
def service_logs() -> Iterator[Callable[[], list[str]]]:
    """``lines = service_logs()`` once the app runs: every line the service logs from then on (its
    start-up replaces the ``textgen`` logger's handlers, and they do not propagate to caplog)."""
    handler = _Collect([])

    def capture() -> list[str]:
        logging.getLogger("textgen").addHandler(handler)
        return handler.into

    yield capture
    logging.getLogger("textgen").removeHandler(handler)


async def wait_for_end(client: httpx.AsyncClient, job_id: str, headers: dict[str, str]) -> dict[str, Any]:
    view: dict[str, Any] = {}

    async def ended() -> bool:
        view.update((await client.get(f"/jobs/{job_id}", headers=headers)).json())
        return view["state"] in TERMINAL

    await wait_until(ended, 30, f"job {job_id} ending")
    return view


def tenant_settings(make_settings: MakeSettings, job_store: str | None, **overrides: Any) -> Any:
    extra = {"job_store": job_store} if job_store else {}
    return make_settings(api_keys=["alice-key", "bob-key"], admin_api_keys=["admin-key"], **extra, **overrides)


async def test_another_tenants_job_is_invisible(
    job_store: str | None, make_settings: MakeSettings, app_client: AppClient
) -> None:
    async with app_client(tenant_settings(make_settings, job_store)) as (client, _app):
        submitted = await client.post("/generate_background", json=JOB, headers={**ALICE, "Idempotency-Key": "k-1"})
        assert submitted.status_code == 202, submitted.text
        alice_job = submitted.json()["job_id"]
        await wait_for_end(client, alice_job, ALICE)

        # Bob: a plain 404 everywhere, exactly as for an id that does not exist.
        unknown = await client.get("/jobs/0123456789abcdef0123456789abcdef", headers=BOB)
        for response in (
            await client.get(f"/jobs/{alice_job}", headers=BOB),
            await client.get(f"/jobs/{alice_job}/stream", headers=BOB),
            await client.delete(f"/jobs/{alice_job}", headers=BOB),
        ):
            assert assert_error(response, 404) == assert_error(unknown, 404)
        listed = await client.get("/jobs", params={"limit": 1000}, headers=BOB)
        assert listed.status_code == 200 and listed.json()["jobs"] == []

        # Bob reusing Alice's Idempotency-Key: his own new job with the same body, and no 409 with another.
        same = await client.post("/generate_background", json=JOB, headers={**BOB, "Idempotency-Key": "k-1"})
        assert same.status_code == 202 and same.json()["job_id"] != alice_job
        other_body = {**JOB, "prompt": "Something else entirely"}
        other = await client.post("/generate_background", json=other_body, headers={**BOB, "Idempotency-Key": "k-2"})
        assert other.status_code == 202
        alice_k2 = await client.post("/generate_background", json=JOB, headers={**ALICE, "Idempotency-Key": "k-2"})
        assert alice_k2.status_code == 202 and alice_k2.json()["job_id"] != other.json()["job_id"]
        replay = await client.post("/generate_background", json=JOB, headers={**ALICE, "Idempotency-Key": "k-1"})
        assert replay.json()["job_id"] == alice_job

        # Alice sees her own jobs in full, and only hers in her list.
        mine = await client.get(f"/jobs/{alice_job}", headers=ALICE)
        assert mine.status_code == 200 and mine.json()["request"]["prompt"] == JOB["prompt"]
        alice_ids = {job["job_id"] for job in (await client.get("/jobs", headers=ALICE)).json()["jobs"]}
        assert alice_ids == {alice_job, alice_k2.json()["job_id"]}

        # The admin sees and cancels everything.
        everyone = {job["job_id"] for job in (await client.get("/jobs", headers=ADMIN)).json()["jobs"]}
        assert alice_ids | {same.json()["job_id"], other.json()["job_id"]} <= everyone
        assert (await client.get(f"/jobs/{alice_job}", headers=ADMIN)).status_code == 200
        async with client.stream("GET", f"/jobs/{alice_job}/stream", headers=ADMIN) as stream:
            assert stream.status_code == 200
            assert "done" in [name async for name, _ in sse_events(stream)]
        queued = await client.post("/generate_background", json=JOB, headers=BOB)
        cancel = await client.delete(f"/jobs/{queued.json()['job_id']}", headers=ADMIN)
        assert cancel.status_code in (200, 409)  # it may have finished already; never a 404 for the admin


async def test_without_keys_everyone_is_the_anonymous_owner(make_settings: MakeSettings, app_client: AppClient) -> None:
    async with app_client(make_settings()) as (client, _app):
        job = (await client.post("/generate_background", json=JOB)).json()["job_id"]
        assert (await client.get(f"/jobs/{job}")).status_code == 200
        assert [j["job_id"] for j in (await client.get("/jobs")).json()["jobs"]] == [job]


# ----- token budgets -------------------------------------------------------------------------------------


async def test_tpm_cannot_be_exceeded_by_concurrency(make_settings: MakeSettings, app_client: AppClient) -> None:
    body = {"prompt": "The future of AI is", "max_new_tokens": 5, "ignore_eos": True}
    tpm = 2 * (FUTURE + 5) + 3  # room for two requests (prompt + output), not three
    async with app_client(make_settings(rate_limit_tpm=tpm)) as (client, _app):
        responses = await asyncio.gather(*(client.post("/generate", json=body) for _ in range(8)))
    ok = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    assert len(ok) + len(refused) == 8
    assert sum(r.json()["prompt_tokens"] + r.json()["completion_tokens"] for r in ok) <= tpm
    assert len(ok) == 2  # exactly the two budgets that fit
    for response in refused:
        assert 1 <= int(response.headers["Retry-After"]) <= 60
        assert "TEXTGEN_RATE_LIMIT_TPM" in response.json()["detail"]


async def test_a_budget_larger_than_the_limit_is_refused_before_any_work(
    make_settings: MakeSettings, app_client: AppClient
) -> None:
    async with app_client(make_settings(rate_limit_tpm=HI + 10)) as (client, _app):
        response = await client.post("/generate", json={"prompt": "Hi", "max_new_tokens": 500})
        assert response.status_code == 429 and int(response.headers["Retry-After"]) >= 1
        assert f"up to {HI + 500} tokens" in response.json()["detail"]
        assert "can never run" in response.json()["detail"]
        ok = await client.post("/generate", json={"prompt": "Hi", "max_new_tokens": 10})
        assert ok.status_code == 200  # the refused request reserved nothing


async def test_unused_budget_is_refunded(make_settings: MakeSettings, app_client: AppClient) -> None:
    # A choice constraint ends the output after a word: prompt + 10 tokens are reserved, fewer are used,
    # and the rest comes back. Without the refund only 2 tokens would be left; with it, more.
    tpm = FUTURE + 12
    async with app_client(make_settings(rate_limit_tpm=tpm)) as (client, _app):
        body = {"prompt": "The future of AI is", "max_new_tokens": 10, "choice": ["yes", "no"]}
        first = await client.post("/generate", json=body)
        assert first.status_code == 200, first.text
        used = first.json()["prompt_tokens"] + first.json()["completion_tokens"]
        assert first.json()["prompt_tokens"] == FUTURE and used < FUTURE + 10
        answers: list[httpx.Response] = []

        async def refunded() -> bool:  # the refund lands once the request's handle is done (429s do no work)
            answers.append(await client.post("/generate", json={"prompt": "Hi", "max_new_tokens": tpm - used - HI}))
            return answers[-1].status_code == 200

        with contextlib.suppress(AssertionError):
            await wait_until(refunded, 10, "the refund", interval_s=0.05)
        second = answers[-1]
        assert second.status_code == 200, second.text


async def test_tpm_cannot_be_exceeded_by_streams_that_hang_up(
    make_settings: MakeSettings, app_client: AppClient
) -> None:
    body = {"prompt": "The future of AI is", "max_new_tokens": 40, "ignore_eos": True, "stream": True}
    async with app_client(make_settings(rate_limit_tpm=FUTURE + 40)) as (_client, app), streaming_client(app) as client:
        async with client.stream("POST", "/generate", json=body) as stream:
            assert stream.status_code == 200
            async for name, _data in sse_events(stream):
                if name == "token":
                    break  # hang up after the first token
        # Its whole budget was reserved up front: nothing more fits while the window lasts.
        again = await client.post("/generate", json={**body, "stream": False, "max_new_tokens": 40})
        assert again.status_code == 429
        assert "TEXTGEN_RATE_LIMIT_TPM" in again.json()["detail"]


async def test_background_jobs_are_charged_to_their_submitter(
    make_settings: MakeSettings, app_client: AppClient
) -> None:
    settings = make_settings(api_keys=["alice-key", "bob-key"], rate_limit_tpm=FUTURE + 10)
    async with app_client(settings) as (client, _app):
        job = {"prompt": "The future of AI is", "max_new_tokens": 10, "ignore_eos": True}
        accepted = await client.post("/generate_background", json=job, headers=ALICE)
        assert accepted.status_code == 202
        refused = await client.post("/generate_background", json={**job, "max_new_tokens": 1}, headers=ALICE)
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
        sync = await client.post("/generate", json={**job, "max_new_tokens": 1}, headers=ALICE)
        assert sync.status_code == 429
        # Bob's budget is his own.
        assert (await client.post("/generate", json={**job, "max_new_tokens": 10}, headers=BOB)).status_code == 200


async def test_a_cancelled_queued_job_gives_its_budget_back(make_settings: MakeSettings, app_client: AppClient) -> None:
    settings = make_settings(rate_limit_tpm=HI + 10, job_poll_interval_s=60.0)
    async with app_client(settings) as (client, app):
        app.state.textgen.runner._paused_until = time.monotonic() + 3600  # keep it queued
        job = {"prompt": "Hi", "max_new_tokens": 10}
        accepted = await client.post("/generate_background", json=job)
        assert accepted.status_code == 202
        assert (await client.post("/generate", json={**job, "max_new_tokens": 1})).status_code == 429
        cancelled = await client.delete(accepted.json()["status_url"])
        assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
        assert (await client.post("/generate", json=job)).status_code == 200


# ----- requests, reads and streams -------------------------------------------------------------------------


async def test_reads_count_against_the_request_limit(make_settings: MakeSettings, app_client: AppClient) -> None:
    async with app_client(make_settings(api_keys=["alice-key", "bob-key"], rate_limit_rpm=3)) as (client, _app):
        statuses = [(await client.get("/jobs", headers=ALICE)).status_code for _ in range(4)]
        assert statuses == [200, 200, 200, 429]
        limited = await client.get("/jobs/0123456789abcdef0123456789abcdef", headers=ALICE)
        assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
        assert (await client.post("/generate", json=JOB, headers=ALICE)).status_code == 429
        assert (await client.get("/jobs", headers=BOB)).status_code == 200


async def test_open_streams_per_caller_are_capped(make_settings: MakeSettings, app_client: AppClient) -> None:
    body = {"prompt": "The future of AI is", "max_new_tokens": 900, "ignore_eos": True, "stream": True}
    settings = make_settings(api_keys=["alice-key", "bob-key"], max_streams_per_caller=1)
    async with app_client(settings) as (_client, app), streaming_client(app) as client:
        async with client.stream("POST", "/generate", json=body, headers=ALICE) as first:
            assert first.status_code == 200
            second = await client.post("/generate", json=body, headers=ALICE)
            assert second.status_code == 429 and int(second.headers["Retry-After"]) >= 1
            assert "TEXTGEN_MAX_STREAMS_PER_CALLER" in second.text
            job = await client.post("/generate_background", json=JOB, headers=ALICE)
            job_stream = await client.get(f"/jobs/{job.json()['job_id']}/stream", headers=ALICE)
            assert job_stream.status_code == 429
            async with client.stream("POST", "/generate", json=body, headers=BOB) as other:
                assert other.status_code == 200  # another caller's cap is its own
        # The first stream ended (the client hung up): its slot is free again.
        alice = app.state.textgen.access.principal_for("Bearer alice-key")
        await wait_until(lambda: not app.state.textgen.streams.open_count(alice), 5, "alice's stream slot freed")
        async with client.stream("POST", "/generate", json=body, headers=ALICE) as again:
            assert again.status_code == 200


# ----- who the caller is without keys ----------------------------------------------------------------------


async def test_rpm_cannot_be_dodged_with_x_forwarded_for(make_settings: MakeSettings, app_client: AppClient) -> None:
    async with app_client(make_settings(rate_limit_rpm=2)) as (client, _app):
        statuses = [
            (await client.post("/generate", json=JOB, headers={"X-Forwarded-For": f"203.0.113.{i}"})).status_code
            for i in range(4)
        ]
        assert statuses == [200, 200, 429, 429]


async def test_x_forwarded_for_is_honoured_from_a_trusted_proxy(
    make_settings: MakeSettings, app_client: AppClient
) -> None:
    settings = make_settings(rate_limit_rpm=2, trusted_proxies=["127.0.0.0/8"])
    async with app_client(settings) as (client, app):
        rotating = [
            (await client.post("/generate", json=JOB, headers={"X-Forwarded-For": f"203.0.113.{i}"})).status_code
            for i in range(4)
        ]
        assert rotating == [200, 200, 200, 200]  # four different clients behind the proxy
        same = [
            (await client.post("/generate", json=JOB, headers={"X-Forwarded-For": "198.51.100.7"})).status_code
            for _ in range(3)
        ]
        assert same == [200, 200, 429]
        # A client that is not the proxy cannot borrow its trust.
        transport = httpx.ASGITransport(app=app, client=("192.0.2.50", 5555))
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as outsider:
            spoofed = [
                (await outsider.post("/generate", json=JOB, headers={"X-Forwarded-For": f"10.9.9.{i}"})).status_code
                for i in range(3)
            ]
        assert spoofed == [200, 200, 429]


async def test_failed_keys_are_limited_per_client_address(
    make_settings: MakeSettings, app_client: AppClient, service_logs: Callable[[], list[str]]
) -> None:
    settings = make_settings(api_keys=["alice-key"], auth_failures_per_minute=5)
    async with app_client(settings) as (client, app):
        lines = service_logs()
        guesses = [
            (await client.get("/jobs", headers={"Authorization": f"Bearer guess-{i}"})).status_code for i in range(8)
        ]
        assert guesses == [401] * 5 + [429] * 3
        locked = await client.get("/jobs", headers={"Authorization": "Bearer guess-9"})
        assert locked.status_code == 429 and int(locked.headers["Retry-After"]) >= 1
        # Someone else behind the same address (a NAT, a shared proxy) with the right key is not locked out.
        assert (await client.get("/jobs", headers=ALICE)).status_code == 200
        transport = httpx.ASGITransport(app=app, client=("192.0.2.50", 5555))
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as elsewhere:
            assert (await elsewhere.get("/jobs", headers={"Authorization": "Bearer typo"})).status_code == 401
    logged = "\n".join(lines)
    assert "invalid API key from 127.0.0.1 (5 in the last minute)" in logged
    assert logged.count("Locking out missing or invalid API keys from 127.0.0.1") == 1  # not once per refusal
    assert "guess-" not in logged and "alice-key" not in logged


# ----- secrets where operators keep them -----------------------------------------------------------------


async def test_a_dotenv_key_is_enforced_and_no_secret_is_ever_logged(
    make_settings: MakeSettings,
    app_client: AppClient,
    service_logs: Callable[[], list[str]],
    tmp_path: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("TEXTGEN_API_KEYS", "TEXTGEN_ADMIN_API_KEYS", "TEXTGEN_WEBHOOK_SECRET"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "webhook-secret").write_text("whsec-0123456789\n", encoding="utf-8")
    (tmp_path / ".env").write_text(
        "TEXTGEN_API_KEYS=dotenv-key-123\nTEXTGEN_ADMIN_API_KEYS=dotenv-admin-456\n"
        f"TEXTGEN_WEBHOOK_SECRET_FILE={tmp_path / 'webhook-secret'}\nTEXTGEN_LOG_LEVEL=DEBUG\n",
        encoding="utf-8",
    )
    settings = make_settings()
    assert settings.api_keys == ["dotenv-key-123"] and settings.webhook_secret == "whsec-0123456789"
    async with app_client(settings) as (client, _app):
        lines = service_logs()
        assert (await client.post("/generate", json=JOB)).status_code == 401
        wrong = await client.post("/generate", json=JOB, headers={"Authorization": "Bearer dotenv-key-12"})
        assert wrong.status_code == 401
        ok = await client.post("/generate", json=JOB, headers={"Authorization": "Bearer dotenv-key-123"})
        assert ok.status_code == 200
        admin = await client.get("/jobs", headers={"Authorization": "Bearer dotenv-admin-456"})
        assert admin.status_code == 200
        metrics = await client.get("/metrics")
    everything = "\n".join(lines) + metrics.text + wrong.text + ok.text
    assert lines, "nothing was logged"
    for secret in ("dotenv-key-12", "dotenv-admin-456", "whsec-0123456789"):
        assert secret not in everything
