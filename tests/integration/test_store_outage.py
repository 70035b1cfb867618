"""A job store outage (Redis server gone) degrades gracefully: job routes answer 503 with Retry-After and
the request id, generation that does not need the store keeps working, and shutdown still completes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_jobs import assert_error
from tests.redis_server import start_redis
from textgen.errors import StoreUnavailableError
from textgen.jobs.redis_store import RedisJobStore

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
