"""The one polling helper for tests: wait for a positive signal, never sleep for time to pass."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

POLL_S = 0.01


async def wait_until(
    condition: Callable[[], bool | Awaitable[bool]], timeout_s: float = 30.0, what: str = "the condition"
) -> float:
    """Poll ``condition`` (a plain or an async predicate) until it holds; return the seconds it took.
    AssertionError naming ``what`` when it does not hold within ``timeout_s``."""
    started = time.monotonic()
    while True:
        outcome = condition()
        if not isinstance(outcome, bool):
            outcome = await outcome
        if outcome:
            return time.monotonic() - started
        assert time.monotonic() - started < timeout_s, f"{what} did not happen within {timeout_s} s"
        await asyncio.sleep(POLL_S)
