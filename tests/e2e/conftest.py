"""End-to-end fixtures over ``tests.support.server``: a real ``uvicorn main:app`` subprocess per need.

``start_server(env, workers=1)`` (function-scoped fixture) starts a server and stops it after the test;
``default_server`` (root conftest) is one session-wide server (``TEXTGEN_JOB_CONCURRENCY=1``) shared by the
tests of every layer whose settings allow it; ``shared_servers.get(env)`` shares one per other set of
settings. The launcher itself (``launch_server``) and the job helpers live in ``tests/support/server.py``,
so every layer imports them from there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.server import Server, enter_together, launch_server


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """``start_server(env, workers=1, job_store=None) -> Server``; all servers of a test share
    ``tmp_path/jobs.db`` unless told otherwise, and all are killed at teardown."""
    with contextlib.ExitStack() as stack:
        counter = iter(range(1_000))

        def start(env: dict[str, str] | None = None, workers: int = 1, *, job_store: Path | None = None) -> Server:
            return stack.enter_context(
                launch_server(env, workers, workdir=tmp_path, job_store=job_store, name=f"server{next(counter)}")
            )

        yield start


@pytest.fixture
def start_servers(tmp_path: Path) -> Iterator[Callable[..., list[Server]]]:
    """``start_servers(env, count=2, job_store=None) -> [Server, ...]``: ``count`` servers on one job store
    started at once, so their imports and model loads overlap (a test that needs several side by side waits
    for one start, not ``count``); all are killed at teardown."""
    with contextlib.ExitStack() as stack:
        counter = iter(range(1_000))

        def start(env: dict[str, str] | None = None, count: int = 2, *, job_store: Path | None = None) -> list[Server]:
            launchers = [
                launch_server(env, workdir=tmp_path, job_store=job_store, name=f"side{next(counter)}")
                for _ in range(count)
            ]
            return enter_together(stack, launchers)

        yield start


@pytest.fixture
def client(default_server: Server) -> Iterator[httpx.Client]:
    with default_server.client() as http:
        yield http
