"""Shared fixtures: a tiny GPT-2 on disk, settings that use it, and an app client with its lifespan."""

from __future__ import annotations

import os

# Tests never reach the hub, even by accident; huggingface_hub reads this once, at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.app import open_app, tiny_settings
from tests.support.redis import RedisServer, start_redis
from tests.support.server import DEFAULT_ENV, Server, SharedServers, note_test
from tests.support.tiny_model import save_tiny_gpt2
from textgen.config import Settings, load_settings

# The costliest test modules run first (make test: -n 2 --dist loadfile); see the module.
pytest_plugins = ["tests.support.module_costs"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture
def make_settings(tiny_model_dir: Path, tmp_path: Path) -> Callable[..., Settings]:
    """Settings on the tiny model, float32, with a fresh job store; keyword overrides win."""

    def build(**overrides: Any) -> Settings:
        return tiny_settings(tiny_model_dir, tmp_path, **overrides)

    return build


@pytest.fixture
def app_client() -> Callable[..., Any]:
    """``async with app_client(settings) as (client, app):`` runs the lifespan around an httpx client."""
    return open_app


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    # Before any fixture starts: a server launched for this test (even a session-wide one) checks its marker.
    note_test(item.nodeid, item.get_closest_marker("server") is not None)


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dir: Path) -> Any:
    """The tiny GPT-2 loaded once through the real loader (float32, CPU)."""
    from textgen.loader import load_model

    return load_model(load_settings(model=str(tiny_model_dir), dtype="float32"))


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server on a free loopback port for the whole session (append-only file on)."""
    server = start_redis(tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def shared_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedServers]:
    """``shared_servers.get(env)``: one real server per set of settings for the whole session (see
    ``tests/support/server.py``); for tests that need a live server and leave it as they found it."""
    with SharedServers(tmp_path_factory) as servers:
        yield servers


@pytest.fixture(scope="session")
def default_server(shared_servers: SharedServers) -> Server:
    """The bundled model with ``DEFAULT_ENV`` (one background job at a time), shared by every layer's tests
    whose settings allow it (e2e, browser, clients): started once, by the first test that asks."""
    return shared_servers.get(DEFAULT_ENV, name="default")
