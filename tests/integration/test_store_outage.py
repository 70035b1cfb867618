"""A job store outage (Redis server gone) degrades gracefully: job routes answer 503 with Retry-After and
the request id, generation that does not need the store keeps working, and shutdown still completes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_jobs import assert_error
from tests.support.redis import start_redis
from tests.support.waiting import wait_until
from textgen.errors import StoreUnavailableError
from textgen.jobs.redis_store import RedisJobStore
from textgen.storage.conditions import CONDITIONS, SETTLE_S

MakeSettings = Callable[..., Any]


async def test_an_unreachable_redis_is_a_retryable_error_in_the_store(tmp_path: Path) -> None:
    server = start_redis(tmp_path / "redis")
    store = RedisJobStore.from_url(server.url(0), prefix="outage")
    try:
        await store.open()
        job = await store.create({"prompt": "hi"}, request_id="r1")
        server.stop()
        with pytest.raises(StoreUnavailableError) as caught:
            await store.get(job.id)
        assert caught.value.status_code == 503 and caught.value.retry_after_s
        with pytest.raises(StoreUnavailableError):
            await store.claim_next("owner:1:x", 30.0)
        with pytest.raises(StoreUnavailableError):
            await store.states([job.id])
    finally:
        server.stop()
        await store.close()


async def test_job_routes_answer_503_while_generation_goes_on(
    tmp_path: Path, make_settings: MakeSettings, app_client: Any
) -> None:
    server = start_redis(tmp_path / "redis")
    try:
        settings = make_settings(job_store=server.url(0))
        async with app_client(settings) as (client, _app):
            accepted = await client.post("/generate_background", json={"prompt": "Hello", "max_new_tokens": 2})
            assert accepted.status_code == 202
            server.stop()

            response = await client.get(accepted.json()["status_url"], headers={"X-Request-ID": "during-outage"})
            assert "unavailable" in assert_error(response, 503)
            assert response.json()["request_id"] == "during-outage"
            assert int(response.headers["Retry-After"]) >= 1
            submit = await client.post("/generate_background", json={"prompt": "Hello"})
            assert_error(submit, 503)

            generated = await client.post("/generate", json={"prompt": "Hello", "max_new_tokens": 3})
            assert generated.status_code == 200, generated.text
        # Leaving the block ran the lifespan shutdown against the dead store: it completed.
    finally:
        server.stop()


async def test_an_unreachable_redis_under_the_rate_limiter_is_a_503(
    tmp_path: Path, make_settings: MakeSettings, app_client: Any
) -> None:
    server = start_redis(tmp_path / "redis")
    try:
        settings = make_settings(job_store=server.url(0), rate_limit_rpm=100, rate_limit_tpm=1000)
        async with app_client(settings) as (client, _app):
            assert (await client.post("/generate", json={"prompt": "Hello", "max_new_tokens": 2})).status_code == 200
            server.stop()
            for path, body in (
                ("/generate", {"prompt": "Hello", "max_new_tokens": 2}),
                ("/v1/completions", {"prompt": "Hello", "max_tokens": 2}),
            ):
                response = await client.post(path, json=body)
                assert response.status_code == 503, response.text
                assert int(response.headers["Retry-After"]) >= 1
                assert "rate limiter" in response.text
    finally:
        server.stop()


class Collect(logging.Handler):
    """Every record of the ``textgen`` loggers. Attached after start-up, since the lifespan replaces the
    handlers (and turns off propagation, so pytest's caplog would see nothing)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def lines(self, level: int) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= level and r.name != "textgen.access"]


@contextmanager
def textgen_logs() -> Iterator[Collect]:
    handler = Collect()
    logger = logging.getLogger("textgen")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_a_redis_outage_is_logged_once_when_it_starts_and_once_when_it_clears(
    tmp_path: Path, make_settings: MakeSettings, app_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: one WARNING per 503, three per runner poll and a traceback every 2 s from the metrics gauges.
    Now: one WARNING naming the cause and the fix, no traceback, and one INFO line with the count when it
    clears. /ready answers 503 naming the condition meanwhile; /health stays 200."""
    clock = FakeClock()
    monkeypatch.setattr(CONDITIONS, "_clock", clock)
    workdir = tmp_path / "redis"
    server = start_redis(workdir)
    try:
        async with app_client(make_settings(job_store=server.url(0), job_poll_interval_s=0.01)) as (client, app):
            state = app.state.textgen
            assert (await client.get("/ready")).status_code == 200
            with textgen_logs() as logs:
                server.stop()
                for _ in range(5):
                    assert_error(await client.post("/generate_background", json={"prompt": "Hello"}), 503)
                ready = await client.get("/ready")
                detail = assert_error(ready, 503)
                assert "Not ready: the job store is unavailable (ConnectionError)" in detail, detail
                assert int(ready.headers["Retry-After"]) >= 1
                assert (await client.get("/health")).status_code == 200
                # The background loops keep failing meanwhile: the runner polls, the gauges refresh.
                polls = state.runner.polls
                gauges = asyncio.create_task(state.refresh_gauges_forever(every_s=0.001))
                await wait_until(lambda: state.runner.polls >= polls + 10, what="ten runner polls in the outage")
                gauges.cancel()
                with suppress(asyncio.CancelledError):
                    await gauges
                during = logs.lines(logging.WARNING)

                server = start_redis(workdir, port=server.port)

                async def accepted() -> bool:
                    return (await client.post("/generate_background", json={"prompt": "Hi"})).status_code == 202

                await wait_until(accepted, what="a job accepted once Redis is back")
                assert (await client.get("/ready")).status_code == 200
                # The outage is over once the store has answered for SETTLE_S without failing (a connection
                # kept from before the restart may fail once): the condition's clock is moved, not waited for.
                assert not [line for line in logs.lines(logging.INFO) if "works again" in line]
                clock.now += SETTLE_S
                await wait_until(
                    lambda: any("works again" in line for line in logs.lines(logging.INFO)),
                    what="the outage logged as over",
                )

            assert len(during) == 1, during
            assert "unreachable" in during[0] and "TEXTGEN_JOB_STORE" in during[0], during
            assert not [r for r in logs.records if r.exc_info], "no traceback for a known condition"
            cleared = [line for line in logs.lines(logging.INFO) if "works again" in line]
            assert len(cleared) == 1, logs.lines(logging.INFO)
            refused = int(cleared[0].split("; ")[1].split()[0])
            assert refused >= 5 + 10, cleared  # the five requests and the runner's polls at least
            assert logs.lines(logging.WARNING) == during, "nothing else was logged at WARNING"
    finally:
        server.stop()
