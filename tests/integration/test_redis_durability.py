"""Redis durability made explicit: the job store refuses a server without its append-only file (unless
TEXTGEN_REDIS_ALLOW_VOLATILE), and on a server with it every accepted job survives a SIGKILL."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.redis import start_redis
from textgen.errors import ConfigError
from textgen.jobs.redis_store import RedisJobStore
from textgen.jobs.store import JobState


async def test_every_accepted_job_survives_a_sigkill(tmp_path: Path) -> None:
    server = start_redis(tmp_path / "redis")
    store = RedisJobStore(server.url(0), prefix="durable")
    try:
        await store.open()
        jobs = [await store.create({"prompt": f"job {i}"}, request_id=f"r{i}") for i in range(20)]
        server.kill9()  # no shutdown, no save: only what the append-only file already holds
        server = start_redis(tmp_path / "redis", port=server.port)
        after = RedisJobStore(server.url(0), prefix="durable")  # a process opening the restarted server
        await after.open()
        try:
            for job in jobs:
                stored = await after.get(job.id)
                assert stored.state is JobState.QUEUED and stored.request == job.request
        finally:
            await after.close()
    finally:
        server.stop()
        await store.close()


async def test_a_server_without_aof_is_refused_with_the_fix(tmp_path: Path) -> None:
    server = start_redis(tmp_path / "redis", appendonly=False)
    store = RedisJobStore(server.url(0), prefix="volatile")
    try:
        with pytest.raises(ConfigError) as refused:
            await store.open()
        message = str(refused.value)
        assert "appendonly yes" in message and "TEXTGEN_REDIS_ALLOW_VOLATILE" in message
    finally:
        server.stop()
        await store.close()


async def test_allow_volatile_starts_with_one_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="textgen.storage.redis")
    server = start_redis(tmp_path / "redis", appendonly=False)
    stores = [RedisJobStore(server.url(0), prefix="volatile", allow_volatile=True) for _ in range(2)]
    try:
        for store in stores:
            await store.open()
        job = await stores[0].create({"prompt": "hi"}, request_id=None)
        assert (await stores[1].get(job.id)).id == job.id
        warnings = [r for r in caplog.records if "appendonly" in r.getMessage()]
        assert len(warnings) == 1 and "jobs may be lost" in warnings[0].getMessage()
    finally:
        server.stop()
        for store in stores:
            await store.close()


async def test_the_service_does_not_start_on_a_volatile_redis(
    tmp_path: Path, make_settings: Callable[..., Any], app_client: Any
) -> None:
    server = start_redis(tmp_path / "redis", appendonly=False)
    try:
        with pytest.raises(SystemExit):
            async with app_client(make_settings(job_store=server.url(0))):
                pass
        async with app_client(make_settings(job_store=server.url(0), redis_allow_volatile=True)) as (client, _app):
            assert (await client.get("/ready")).status_code == 200
    finally:
        server.stop()
