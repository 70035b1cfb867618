"""The test support package's own promises: the server marker is enforced, and waiting fails by name."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

from tests.support import server
from tests.support.waiting import wait_until, wait_until_sync


def test_a_test_without_the_server_marker_cannot_start_a_server() -> None:
    server.note_test("tests/somewhere.py::test_x", has_server_marker=False)
    try:
        with pytest.raises(pytest.fail.Exception, match=r"test_x starts a real server .*@pytest.mark.server"):
            server.require_server_marker()
        server.note_test("tests/somewhere.py::test_y", has_server_marker=True)
        server.require_server_marker()  # allowed
    finally:
        server.note_test("tests/unit/test_support.py", has_server_marker=False)


def test_this_test_is_known_to_carry_no_server_marker() -> None:
    # The root conftest told the launcher which test is being set up, before its fixtures ran.
    with pytest.raises(pytest.fail.Exception, match="test_this_test_is_known_to_carry_no_server_marker"):
        server.require_server_marker()


def test_wait_until_sync_returns_once_the_condition_holds_and_names_what_never_did() -> None:
    calls = itertools.count()
    assert wait_until_sync(lambda: next(calls) >= 3, 5, "three calls", interval_s=0) >= 0
    with pytest.raises(AssertionError, match="never did not happen within 0 s"):
        wait_until_sync(lambda: False, 0.0, "never", interval_s=0)


def test_wait_until_sync_stops_early_when_still_ok_fails() -> None:
    def dead() -> None:
        raise RuntimeError("the server died")

    with pytest.raises(RuntimeError, match="the server died"):
        wait_until_sync(lambda: False, 30, "anything", still_ok=dead)


async def test_wait_until_takes_async_predicates() -> None:
    calls = itertools.count()

    async def third_call() -> bool:
        return next(calls) >= 2

    assert await wait_until(third_call, 5, "the third call") >= 0


def test_every_sleep_in_the_tests_says_why_it_is_not_waiting_for_time() -> None:
    """Tests never sleep for time to pass (inject a clock, wait on an event or ``wait_until``); the few sleeps
    left (a polling interval, a fake server's service time) carry a comment on the same line saying why."""
    tests_dir = Path(__file__).resolve().parents[1]
    unexplained = [
        f"{path.relative_to(tests_dir.parent)}:{number}: {line.strip()}"
        for path in sorted(
            [*tests_dir.rglob("*.py"), tests_dir.parent / "test_main.py", tests_dir.parent / "conftest.py"]
        )
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if re.search(r"\b(time|asyncio)\.sleep\(", line) and "#" not in line.split("sleep(", 1)[1]
    ]
    assert not unexplained, "sleeps without a reason:\n" + "\n".join(unexplained)
