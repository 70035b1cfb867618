"""The app in-process on the tiny GPT-2: the settings every in-process test starts from, and the app with its
lifespan behind an httpx client (ASGITransport). The root conftest's ``make_settings`` and ``app_client``
fixtures and the module-scoped apps of the integration tests are all built from these two."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from main import create_app
from textgen.config import Settings, load_settings


def tiny_settings(model_dir: Path, folder: Path, **overrides: Any) -> Settings:
    """Settings on the tiny model, float32, with a job store and cache under ``folder``; overrides win."""
    values: dict[str, Any] = {
        "model": str(model_dir),
        "dtype": "float32",
        "job_store": f"sqlite:///{folder / 'jobs.db'}",
        "cache_dir": folder / "cache",
        "job_poll_interval_s": 0.05,
        "shutdown_grace_s": 2.0,
        # What the tests' /v1 requests and batch lines name in "model" (an unknown name is a 404).
        "model_aliases": "default,tiny",
    }
    values.update(overrides)
    return load_settings(**values)


def multi_settings(models: dict[str, Path], folder: Path, **overrides: Any) -> Settings:
    """``tiny_settings`` serving several models (TEXTGEN_MODELS: name=folder, the first the default)."""
    values = tiny_settings(Path("unused"), folder).model_dump(
        include={"dtype", "job_store", "cache_dir", "job_poll_interval_s", "shutdown_grace_s", "model_aliases"}
    )
    values["models"] = ",".join(f"{name}={path}" for name, path in models.items())
    values.update(overrides)
    return load_settings(**values)


@asynccontextmanager
async def open_app(settings: Settings, **app_kwargs: Any) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI]]:
    """``async with open_app(settings) as (client, app):`` runs the lifespan around an httpx client."""
    app = create_app(settings, **app_kwargs)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=60) as client:
            yield client, app
