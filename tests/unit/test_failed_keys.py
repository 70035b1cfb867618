"""The failed-key lockout: guessing from one address is throttled, a valid key from that address is not.

``FailedKeyLimiter`` on an injected clock, and the API-key middleware over a two-route Starlette app
(no model): the lockout is per client address, counts only failures, and is logged once when it starts
and once when it is over, never once per refused request.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from types import SimpleNamespace

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from textgen.access import AccessPolicy, FailedKeyLimiter, owner_id_for_key, warn_about_short_keys
from textgen.api.security import APIKeyMiddleware, ClientAddressMiddleware

KEY = "right-key-0123456789abcdef"
NAT = ("198.51.100.7", 4000)  # one public address, many people behind it


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def count(self, text: str) -> int:
        return sum(text in line for line in self.lines)


@pytest.fixture
def logged() -> Iterator[Lines]:
    # Straight on the logger: the service's logging set-up may have stopped propagation to caplog.
    handler = Lines()
    logger = logging.getLogger("textgen")
    logger.addHandler(handler)
    previous = logger.level
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(previous)


STARTED = "Locking out missing or invalid API keys from"
OVER = "Lockout of missing or invalid API keys from"


def test_failures_past_the_budget_are_refused_until_a_minute_passes_with_fewer(logged: Lines) -> None:
    clock = Clock()
    limiter = FailedKeyLimiter(5, clock=clock)
    answers = [limiter.record("10.0.0.1").retry_after_s for _ in range(8)]
    assert answers[:5] == [None] * 5  # the budget: 401s
    assert all(wait is not None and 59 <= wait <= 60 for wait in answers[5:])
    assert logged.count(STARTED) == 1
    # A guesser that keeps going stays locked out: failures while locked out count.
    clock.now += 50
    assert all(limiter.record("10.0.0.1").retry_after_s is not None for _ in range(5))
    clock.now += 30  # 80 s after the first burst, 30 s after the second
    assert limiter.retry_after_s("10.0.0.1") == pytest.approx(30)
    clock.now += 31  # now fewer than five failures in the last minute
    assert limiter.retry_after_s("10.0.0.1") is None
    assert limiter.record("10.0.0.1").retry_after_s is None  # a fresh budget
    assert logged.count(STARTED) == 1 and logged.count(OVER) == 1
    assert "is over after 110 s (8 refused meanwhile)" in next(line for line in logged.lines if OVER in line)


def test_the_end_of_a_lockout_is_logged_once_whoever_asks_next(logged: Lines) -> None:
    clock = Clock()
    limiter = FailedKeyLimiter(3, clock=clock)
    for _ in range(4):
        limiter.record("10.0.0.1")
    clock.now += 120
    limiter.retry_after_s("192.0.2.9")  # another address: the guesser never came back
    limiter.retry_after_s("192.0.2.9")
    clock.now += 5
    limiter.record("192.0.2.9")
    assert logged.count(OVER) == 1
    assert "10.0.0.1 is over after 60 s (1 refused meanwhile)" in next(line for line in logged.lines if OVER in line)


def test_memory_per_address_is_bounded_however_fast_it_guesses() -> None:
    clock = Clock()
    limiter = FailedKeyLimiter(10, clock=clock)
    for _ in range(10_000):
        limiter.record("10.0.0.1")
    assert len(limiter._failures["10.0.0.1"]) == 10
    unlimited = FailedKeyLimiter(0, clock=clock)
    assert all(unlimited.record("10.0.0.1").retry_after_s is None for _ in range(1_000))
    assert len(unlimited._failures["10.0.0.1"]) <= FailedKeyLimiter.UNLIMITED_MEMORY


def service(limiter: FailedKeyLimiter, trusted: list[str] | None = None) -> Starlette:
    async def jobs(request: Request) -> PlainTextResponse:
        return PlainTextResponse(request.scope["state"]["caller"].owner_id)

    app = Starlette(routes=[Route("/jobs", jobs), Route("/health", jobs)])
    app.add_middleware(APIKeyMiddleware)
    app.add_middleware(ClientAddressMiddleware)
    access = AccessPolicy.from_sources([KEY], None, ["/health"], trusted_proxies=trusted or [])
    app.state.textgen = SimpleNamespace(access=access, failed_keys=limiter)
    return app


async def statuses(app: Starlette, client: tuple[str, int], keys: list[str], **headers: str) -> list[int]:
    transport = httpx.ASGITransport(app=app, client=client)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        return [
            (await http.get("/jobs", headers={"Authorization": f"Bearer {key}", **headers})).status_code for key in keys
        ]


async def test_a_valid_key_from_an_address_locked_out_for_bad_keys_still_works(logged: Lines) -> None:
    clock = Clock()
    app = service(FailedKeyLimiter(5, clock=clock))
    guesses = await statuses(app, NAT, [f"guess-{i}" for i in range(20)])
    assert guesses == [401] * 5 + [429] * 15
    # Before the fix: 429 for everyone behind the NAT. The valid key is checked and accepted.
    assert await statuses(app, NAT, [KEY] * 10) == [200] * 10
    assert await statuses(app, NAT, ["guess-again"]) == [429]  # and the guesser is still throttled
    clock.now += 61  # a minute of valid keys only: they were never charged, so the budget is back
    assert await statuses(app, NAT, [KEY] * 10) == [200] * 10
    assert logged.count(STARTED) == 1  # once, not per refused request
    assert logged.count(OVER) == 1  # noticed on the next request, a valid one
    assert await statuses(app, NAT, ["typo"]) == [401]
    assert logged.count("Rejected a missing or invalid API key") == 6
    assert not any("guess-" in line or KEY in line for line in logged.lines)


async def test_the_lockout_is_per_client_address_behind_a_trusted_proxy() -> None:
    limiter = FailedKeyLimiter(3, clock=Clock())
    app = service(limiter, trusted=["10.0.0.5"])
    proxy = ("10.0.0.5", 443)
    guesser = await statuses(app, proxy, ["a", "b", "c", "d"], **{"X-Forwarded-For": "203.0.113.66"})
    assert guesser == [401, 401, 401, 429]
    # Another client of the same proxy is another address: its typo is a plain 401.
    assert await statuses(app, proxy, ["typo"], **{"X-Forwarded-For": "203.0.113.67"}) == [401]
    # A caller that is not the proxy cannot spread its guesses over forwarded addresses.
    spoofed = [(await statuses(app, NAT, [f"g{i}"], **{"X-Forwarded-For": f"203.0.113.{i}"}))[0] for i in range(1, 6)]
    assert spoofed == [401, 401, 401, 429, 429]


async def test_exempt_paths_ignore_wrong_keys_without_counting_them() -> None:
    limiter = FailedKeyLimiter(2, clock=Clock())
    app = service(limiter)
    transport = httpx.ASGITransport(app=app, client=NAT)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        health = [(await http.get("/health", headers={"Authorization": "Bearer stale"})).status_code for _ in range(5)]
    assert health == [200] * 5
    assert limiter.retry_after_s(NAT[0]) is None


def test_short_keys_are_named_at_start_up_by_owner_id_never_by_value(logged: Lines) -> None:
    assert not warn_about_short_keys(AccessPolicy.from_sources([KEY], None, []))
    assert warn_about_short_keys(AccessPolicy.from_sources([KEY, "alice-key"], None, []))
    (line,) = [line for line in logged.lines if "shorter than" in line]
    assert owner_id_for_key("alice-key") in line and "alice-key" not in line and owner_id_for_key(KEY) not in line
