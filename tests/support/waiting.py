"""The one polling helper for tests: wait for a positive signal, never sleep for time to pass.

``wait_until`` (async) and ``wait_until_sync`` (threads, subprocess tests) poll a predicate until it holds
and return the seconds it took; both fail naming ``what`` when it does not hold in time, and both can be
given ``still_ok``, a check that fails at once (with its own message) when waiting has become pointless,
e.g. the server under test has died.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

POLL_S = 0.01
SYNC_POLL_S = 0.05  # a synchronous predicate is often an HTTP call or a file read: poll it less often


async def wait_until(
    condition: Callable[[], bool | Awaitable[bool]],
    timeout_s: float = 30.0,
    what: str = "the condition",
    *,
    interval_s: float = POLL_S,
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
        await asyncio.sleep(interval_s)  # the polling interval: we wait for the condition, not for a time


def wait_until_sync(
    condition: Callable[[], bool],
    timeout_s: float = 30.0,
    what: str = "the condition",
    *,
    interval_s: float = SYNC_POLL_S,
    still_ok: Callable[[], None] | None = None,
) -> float:
    """``wait_until`` for synchronous code; ``still_ok`` (if given) runs before each poll and raises to stop
    waiting early. Returns the seconds it took; AssertionError naming ``what`` on timeout."""
    started = time.monotonic()
    while True:
        if still_ok is not None:
            still_ok()
        if condition():
            return time.monotonic() - started
        assert time.monotonic() - started < timeout_s, f"{what} did not happen within {timeout_s:.0f} s"
        time.sleep(interval_s)  # the polling interval: we wait for the condition, not for a time
