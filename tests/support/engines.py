"""Engines a test starts and must stop: ``engines_stopped_after`` for a fixture that hands a test an engine
factory (``make_engine``), so that each module writes only how it builds its engines."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Protocol, TypeVar


class Startable(Protocol):
    async def start(self) -> None: ...

    async def stop(self, grace_s: float) -> None: ...


E = TypeVar("E", bound=Startable)


class StartedEngines:
    """The engines started through ``start``, in order."""

    def __init__(self) -> None:
        self.engines: list[Startable] = []

    async def start(self, engine: E) -> E:
        await engine.start()
        self.engines.append(engine)
        return engine


@contextlib.asynccontextmanager
async def engines_stopped_after() -> AsyncIterator[StartedEngines]:
    """Every engine started inside the block is stopped (no grace period) when it ends, however it ends."""
    started = StartedEngines()
    try:
        yield started
    finally:
        for engine in started.engines:
            await engine.stop(0)
