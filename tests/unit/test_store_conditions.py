"""ConditionLog: a store condition is logged once when it starts and once when it clears (with how long it
lasted and how many operations were refused), on an injected clock; write-refusing conditions clear only
after a successful write, and an outage only once the store has answered for SETTLE_S without failing, so
reads in between, or a connection kept from before a restart, do not make the pair flap."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from textgen.storage.conditions import SETTLE_S, ConditionLog


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Records(logging.Handler):
    """The module's records, whatever the app's logging set-up did to propagation (pytest's caplog sees
    nothing once a lifespan has run ``setup_logging`` in this process)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def caplog() -> Iterator[Records]:  # the name the tests below read naturally with
    handler = Records()
    logger = logging.getLogger("textgen.storage.conditions")
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


def lines(caplog: Records) -> list[tuple[str, str]]:
    return [(r.levelname, r.getMessage()) for r in caplog.records]


def test_logged_once_at_start_and_once_at_clear_with_duration_and_count(caplog: Records) -> None:
    clock = FakeClock()
    log = ConditionLog(clock)
    for _ in range(40):
        log.enter("redis r", "unreachable", "Redis at r is unreachable. Start it.")
    clock.now += 12.5
    log.clear("redis r", wrote=False)  # it answers again (a read is enough for an outage) ...
    clock.now += 1.0
    log.enter("redis r", "unreachable", "Redis at r is unreachable. Start it.")  # ... a stale pooled connection
    log.clear("redis r")
    clock.now += SETTLE_S - 0.1
    log.clear("redis r")  # not yet: answering for less than SETTLE_S since the last failure
    assert [level for level, _ in lines(caplog)] == ["WARNING"]
    clock.now += 0.1
    log.clear("redis r")
    assert lines(caplog) == [
        (
            "WARNING",
            "Redis at r is unreachable. Start it. (logged once: further failures are counted, and one line "
            "follows when it clears)",
        ),
        ("INFO", "Store redis r works again after 13.5 s (was: unreachable); 41 operation(s) were refused meanwhile"),
    ]
    assert log.current("redis r") is None


def test_a_write_refusal_clears_only_after_a_write(caplog: Records) -> None:
    clock = FakeClock()
    log = ConditionLog(clock)
    for _ in range(5):  # a full disk: writes fail, the reads between them succeed
        log.enter("sqlite f", "disk full", "The disk is full.", writes_only=True)
        log.clear("sqlite f", wrote=False)
    assert [level for level, _ in lines(caplog)] == ["WARNING"]
    assert log.current("sqlite f") == "disk full" and "sqlite f" in log.active()
    clock.now += 3.0
    log.clear("sqlite f", wrote=True)
    assert [level for level, _ in lines(caplog)] == ["WARNING", "INFO"]
    assert "after 3.0 s" in lines(caplog)[1][1] and "5 operation(s)" in lines(caplog)[1][1]


def test_a_different_condition_is_logged_when_it_replaces_one(caplog: Records) -> None:
    log = ConditionLog(FakeClock())
    log.enter("sqlite f", "locked", "Locked.", writes_only=True)
    log.enter("sqlite f", "disk full", "Full.", writes_only=True)
    log.enter("sqlite f", "disk full", "Full.", writes_only=True)
    assert [message.split(" (")[0] for _, message in lines(caplog)] == ["Locked.", "Full."]
