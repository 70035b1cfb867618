"""Per-key rate limits (``textgen.ratelimit``): every behaviour test runs against the SQLite limiter
(in the job store's file) and the Redis one (on the session's real redis-server, under a prefix of the
test's own); then what only one backend has."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import subprocess
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import closing
from pathlib import Path

import pytest
import redis

from tests.support.net import free_port
from tests.support.redis import RedisServer
from tests.unit.conftest import Backend
from textgen.backends import rate_limiter_from_settings
from textgen.config import Settings
from textgen.errors import ConfigError, RateLimitedError
from textgen.jobs.redis_store import RedisJobStore
from textgen.jobs.sqlite_store import SQLiteJobStore
from textgen.ratelimit import (
    WINDOW_S,
    NoRateLimit,
    RateLimiter,
    RedisRateLimiter,
    Reservation,
    SQLiteRateLimiter,
    TokenBudgetTooLargeError,
    key_digest,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
KEY = "sk-secret-key-1"


class FakeClock:
    def __init__(self, now: float = 6_000_000.0) -> None:  # a window boundary (divisible by 60)
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


Limiter = SQLiteRateLimiter | RedisRateLimiter


class Where(Backend):
    """Where one test's counts live: the conformance suite's ``Backend`` (a SQLite file or a Redis prefix)."""

    def limiter(self, rpm: int, tpm: int, clock: Callable[[], float]) -> Limiter:
        if self.name == "redis":
            return RedisRateLimiter(
                self.target, requests_per_minute=rpm, tokens_per_minute=tpm, clock=clock, prefix=self.prefix
            )
        return SQLiteRateLimiter(Path(self.target), requests_per_minute=rpm, tokens_per_minute=tpm, clock=clock)

    def requests_counted(self, key: str, now: float) -> int:
        """The requests counted for ``key`` in the window of ``now``."""
        window = int(now // WINDOW_S)
        if self.name == "redis":
            with closing(redis.Redis.from_url(self.target)) as raw:
                return int(raw.hget(f"{self.prefix}:ratelimit:{key_digest(key)}:{window}", "requests") or 0)
        with closing(sqlite3.connect(self.target)) as conn:
            row = conn.execute(
                "SELECT requests FROM rate_limits WHERE key_hash = ? AND win = ?", (key_digest(key), window)
            ).fetchone()
        return 0 if row is None else int(row[0])

    def stored_bytes(self) -> bytes:
        """Everything stored: the file and its write-ahead log, or every key and value under the prefix."""
        if self.name == "sqlite":
            files = [Path(self.target), Path(self.target + "-wal")]
            return b"".join(f.read_bytes() for f in files if f.exists())
        with closing(redis.Redis.from_url(self.target)) as raw:
            dump = b""
            for name in raw.scan_iter(match=f"{self.prefix}:*"):
                dump += name + b"".join(k + v for k, v in raw.hgetall(name).items())
            return dump


@pytest.fixture
def where(backend: Backend) -> Where:
    """Parametrized over SQLite and Redis by ``backend`` (tests/unit/conftest.py), which also cleans up."""
    return Where(backend.name, backend.target, backend.prefix)


LimiterFactory = Callable[..., Limiter]


@pytest.fixture
async def make(where: Where, clock: FakeClock) -> AsyncIterator[LimiterFactory]:
    """``make(rpm=, tpm=)``: a limiter on the test's shared counts (not opened); all closed afterwards."""
    made: list[Limiter] = []

    def factory(rpm: int = 0, tpm: int = 0) -> Limiter:
        limiter = where.limiter(rpm, tpm, clock)
        made.append(limiter)
        return limiter

    yield factory
    for limiter in made:
        await limiter.close()


async def _opened(limiter: Limiter) -> Limiter:
    await limiter.open()
    return limiter


async def test_rpm_refuses_fourth(make: LimiterFactory) -> None:
    limiter = await _opened(make(rpm=3))
    assert isinstance(limiter, RateLimiter)
    for _ in range(3):
        await limiter.acquire(KEY)
    with pytest.raises(RateLimitedError) as info:
        await limiter.acquire(KEY)
    err = info.value
    assert err.status_code == 429 and err.retry_after_s is not None and 1 <= err.retry_after_s <= 60
    assert "requests per minute" in err.message and "TEXTGEN_RATE_LIMIT_RPM" in err.message
    assert KEY not in err.message


async def test_retry_after_counts_to_window_end(make: LimiterFactory, clock: FakeClock) -> None:
    limiter = await _opened(make(rpm=1))
    clock.now += 45.3
    await limiter.acquire(KEY)
    with pytest.raises(RateLimitedError) as info:
        await limiter.acquire(KEY)
    assert info.value.retry_after_s == 15  # ceil(60 - 45.3)
    clock.now += 14.65  # 0.05 s before the window ends: still at least 1
    with pytest.raises(RateLimitedError) as info:
        await limiter.acquire(KEY)
    assert info.value.retry_after_s == 1


async def test_refused_requests_not_counted(make: LimiterFactory, where: Where, clock: FakeClock) -> None:
    limiter = await _opened(make(rpm=2))
    await limiter.acquire(KEY)
    await limiter.acquire(KEY)
    for _ in range(5):
        with pytest.raises(RateLimitedError):
            await limiter.acquire(KEY)
    assert where.requests_counted(KEY, clock.now) == 2


async def test_keys_are_independent(make: LimiterFactory) -> None:
    limiter = await _opened(make(rpm=1))
    await limiter.acquire("a")
    with pytest.raises(RateLimitedError):
        await limiter.acquire("a")
    await limiter.acquire("b")


async def test_next_window_resets(make: LimiterFactory, clock: FakeClock) -> None:
    limiter = await _opened(make(rpm=2, tpm=5))
    await limiter.acquire(KEY)
    await limiter.charge_tokens(KEY, 5)
    with pytest.raises(RateLimitedError):
        await limiter.reserve(KEY, 1)
    clock.now += 60
    assert await limiter.reserve(KEY, 5) is not None
    await limiter.acquire(KEY)
    await limiter.acquire(KEY)
    with pytest.raises(RateLimitedError):
        await limiter.acquire(KEY)


async def test_tpm_refuses_after_charge(make: LimiterFactory) -> None:
    limiter = await _opened(make(tpm=10))
    await limiter.acquire(KEY)
    await limiter.charge_tokens(KEY, 9)
    await limiter.reserve(KEY, 1)  # 9 + 1 <= 10: still allowed
    with pytest.raises(RateLimitedError) as info:
        await limiter.reserve(KEY, 1)
    msg = info.value.message
    assert "tokens per minute" in msg and "TEXTGEN_RATE_LIMIT_TPM" in msg and KEY not in msg
    assert info.value.retry_after_s is not None and 1 <= info.value.retry_after_s <= 60
    await limiter.acquire(KEY)  # a spent token budget does not refuse requests that generate nothing
    await limiter.reserve("other", 10)  # token budgets are per key too


async def test_charge_tokens_validates(make: LimiterFactory) -> None:
    limiter = await _opened(make(tpm=10))
    await limiter.charge_tokens(KEY, 0)
    with pytest.raises(ValueError, match="tokens"):
        await limiter.charge_tokens(KEY, -1)
    await limiter.acquire(KEY)


async def test_two_limiters_share_counts(make: LimiterFactory) -> None:
    a = await _opened(make(rpm=4, tpm=100))
    b = await _opened(make(rpm=4, tpm=100))
    await a.acquire(KEY)
    await b.acquire(KEY)
    await a.acquire(KEY)
    await b.acquire(KEY)
    for limiter in (a, b):
        with pytest.raises(RateLimitedError):
            await limiter.acquire(KEY)
    await a.charge_tokens("t", 60)
    await b.charge_tokens("t", 40)
    with pytest.raises(RateLimitedError, match="tokens"):
        await a.reserve("t", 1)


async def test_concurrent_acquires_exact(make: LimiterFactory) -> None:
    limiters = [await _opened(make(rpm=7)) for _ in range(3)]
    outcomes = await asyncio.gather(*(limiters[i % 3].acquire(KEY) for i in range(30)), return_exceptions=True)
    assert sum(o is None for o in outcomes) == 7
    assert all(isinstance(o, RateLimitedError) for o in outcomes if o is not None)


async def test_reserve_takes_the_whole_budget_up_front(make: LimiterFactory) -> None:
    limiter = await _opened(make(tpm=100))
    first = await limiter.reserve(KEY, 60)
    assert first is not None and first.tokens == 60
    with pytest.raises(RateLimitedError) as info:  # 60 + 41 > 100: refused before any work
        await limiter.reserve(KEY, 41)
    assert "reserves 41" in info.value.message and info.value.retry_after_s is not None
    assert await limiter.reserve(KEY, 40) is not None  # exactly 100


async def test_a_budget_larger_than_the_limit_never_fits(make: LimiterFactory) -> None:
    limiter = await _opened(make(tpm=10))
    with pytest.raises(RateLimitedError) as info:
        await limiter.reserve(KEY, 500)
    assert "up to 500 tokens" in info.value.message and "max_new_tokens" in info.value.message
    assert await limiter.reserve(KEY, 10) is not None  # the refused one reserved nothing


async def test_refund_gives_back_unused_tokens_in_the_same_window(make: LimiterFactory, clock: FakeClock) -> None:
    limiter = await _opened(make(tpm=100))
    reservation = await limiter.reserve(KEY, 100)
    with pytest.raises(RateLimitedError):
        await limiter.reserve(KEY, 1)
    await limiter.refund(reservation, 70)  # used 30
    assert await limiter.reserve(KEY, 70) is not None
    with pytest.raises(RateLimitedError):
        await limiter.reserve(KEY, 1)
    # A refund can never give back more than was reserved, nor arrive in a later window's count.
    late = await limiter.reserve("late", 50)
    clock.now += 60
    fresh = await limiter.reserve("late", 100)
    await limiter.refund(late, 50)
    with pytest.raises(RateLimitedError):
        await limiter.reserve("late", 1)
    await limiter.refund(fresh, 10_000)
    assert await limiter.reserve("late", 100) is not None


async def test_concurrent_reservations_never_overshoot(make: LimiterFactory) -> None:
    limiters = [await _opened(make(tpm=100)) for _ in range(3)]
    outcomes = await asyncio.gather(*(limiters[i % 3].reserve(KEY, 30) for i in range(12)), return_exceptions=True)
    assert sum(not isinstance(o, BaseException) for o in outcomes) == 3  # 3 x 30 <= 100 < 4 x 30


async def test_reservation_round_trips_through_its_stored_form(make: LimiterFactory) -> None:
    limiter = await _opened(make(tpm=100))
    reservation = await limiter.reserve(KEY, 20)
    assert reservation is not None and Reservation.decode(reservation.encode()) == reservation
    assert KEY not in reservation.encode()
    assert Reservation.decode(None) is None


async def test_a_reservation_keeps_its_prompt_share_and_old_records_still_decode(make: LimiterFactory) -> None:
    limiter = await _opened(make(tpm=100))
    reservation = await limiter.reserve(KEY, 30, prompt_tokens=12)
    assert reservation is not None and reservation.prompt_tokens == 12
    assert Reservation.decode(reservation.encode()) == reservation
    legacy = f"{reservation.window}:30:{reservation.digest}"  # stored before prompts were charged
    assert Reservation.decode(legacy) == Reservation(reservation.digest, reservation.window, 30, 0)
    with pytest.raises(ValueError):
        await limiter.reserve(KEY, 10, prompt_tokens=11)


async def test_a_request_and_its_tokens_are_counted_together_or_not_at_all(
    make: LimiterFactory, where: Where, clock: FakeClock
) -> None:
    limiter = await _opened(make(rpm=2, tpm=100))
    assert await limiter.reserve(KEY, 60, requests=1) is not None
    with pytest.raises(RateLimitedError):  # the tokens do not fit: the request is not counted either
        await limiter.reserve(KEY, 41, requests=1)
    assert where.requests_counted(KEY, clock.now) == 1
    assert await limiter.reserve(KEY, 40, requests=1) is not None
    with pytest.raises(RateLimitedError) as info:  # the request does not fit: no tokens are taken
        await limiter.reserve(KEY, 0, requests=1)
    assert "TEXTGEN_RATE_LIMIT_RPM" in info.value.message
    assert where.requests_counted(KEY, clock.now) == 2 and await limiter.available_tokens(KEY) == 0


async def test_available_tokens_is_what_the_window_has_left(make: LimiterFactory, clock: FakeClock) -> None:
    assert await (await _opened(make(rpm=5))).available_tokens(KEY) is None  # no token limit
    limiter = await _opened(make(tpm=100))
    assert await limiter.available_tokens(KEY) == 100
    reservation = await limiter.reserve(KEY, 70)
    assert await limiter.available_tokens(KEY) == 30
    await limiter.refund(reservation, 20)
    assert await limiter.available_tokens(KEY) == 50 and await limiter.available_tokens("other") == 100
    clock.now += WINDOW_S
    assert await limiter.available_tokens(KEY) == 100


async def test_a_budget_over_a_whole_window_is_its_own_kind_of_refusal(make: LimiterFactory) -> None:
    limiter = await _opened(make(tpm=10))
    with pytest.raises(TokenBudgetTooLargeError) as info:
        await limiter.reserve(KEY, 11)
    assert "can never run" in info.value.message and info.value.status_code == 429
    await limiter.reserve(KEY, 10)
    with pytest.raises(RateLimitedError) as spent:
        await limiter.reserve(KEY, 1)
    assert not isinstance(spent.value, TokenBudgetTooLargeError)  # this one only has to wait


_ACQUIRER = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from textgen.errors import RateLimitedError
    from textgen.ratelimit import RedisRateLimiter, SQLiteRateLimiter

    async def main() -> None:
        kind, target, prefix = sys.argv[1:4]
        limits = {"requests_per_minute": 25, "tokens_per_minute": 0, "clock": lambda: 6_000_010.0}
        if kind == "redis":
            limiter = RedisRateLimiter(target, prefix=prefix, **limits)
        else:
            limiter = SQLiteRateLimiter(Path(target), **limits)
        await limiter.open()
        ok = 0
        for _ in range(20):
            try:
                await limiter.acquire("shared")
                ok += 1
            except RateLimitedError:
                pass
        sys.stdout.write(str(ok))
        await limiter.close()

    asyncio.run(main())
    """
)


async def test_limit_holds_across_processes(where: Where) -> None:
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _ACQUIRER,
            where.name,
            where.target,
            where.prefix or "-",
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
        )
        for _ in range(3)
    ]
    outs = [await p.communicate() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0]
    assert sum(int(out) for out, _ in outs) == 25


async def test_keys_never_stored_or_logged(
    make: LimiterFactory, where: Where, caplog: pytest.LogCaptureFixture
) -> None:
    limiter = await _opened(make(rpm=1, tpm=50))
    caplog.set_level(logging.DEBUG, logger="textgen")
    await limiter.acquire(KEY)
    await limiter.charge_tokens(KEY, 3)
    with pytest.raises(RateLimitedError):
        await limiter.acquire(KEY)
    assert KEY not in caplog.text and key_digest(KEY)[:12] in caplog.text
    stored = where.stored_bytes()
    assert key_digest(KEY).encode() in stored and KEY.encode() not in stored


async def test_acquire_before_open_fails(make: LimiterFactory) -> None:
    with pytest.raises(RuntimeError, match="not open"):
        await make(rpm=1).acquire(KEY)


def test_negative_limits_rejected(where: Where) -> None:
    with pytest.raises(ValueError):
        where.limiter(-1, 0, FakeClock())
    with pytest.raises(ValueError):
        where.limiter(0, -1, FakeClock())


async def test_no_rate_limit_never_raises() -> None:
    limiter = NoRateLimit()
    assert isinstance(limiter, RateLimiter)
    await limiter.open()
    for _ in range(1000):
        await limiter.acquire(KEY)
    await limiter.charge_tokens(KEY, 10**9)
    await limiter.acquire(KEY)
    await limiter.close()


# --- SQLite only -------------------------------------------------------------------------------------


async def test_sqlite_old_windows_pruned(tmp_path: Path, clock: FakeClock) -> None:
    limiter = SQLiteRateLimiter(tmp_path / "jobs.db", requests_per_minute=5, tokens_per_minute=0, clock=clock)
    await limiter.open()
    try:
        await limiter.acquire("a")
        clock.now += 60
        await limiter.acquire("b")  # previous window kept (window - 1)
        clock.now += 60
        await limiter.acquire("c")  # the first window (now - 2) is deleted
    finally:
        await limiter.close()
    with closing(sqlite3.connect(tmp_path / "jobs.db")) as conn:
        rows = conn.execute("SELECT key_hash, win FROM rate_limits ORDER BY win").fetchall()
    base = int(clock.now // 60)
    assert rows == [(key_digest("b"), base - 1), (key_digest("c"), base)]


async def test_sqlite_shares_file_with_job_store(tmp_path: Path, clock: FakeClock) -> None:
    store = SQLiteJobStore(tmp_path / "jobs.db")
    await store.open()
    limiter = SQLiteRateLimiter(tmp_path / "jobs.db", requests_per_minute=1, tokens_per_minute=0, clock=clock)
    await limiter.open()
    try:
        job = await store.create({"a": 1}, request_id=None)
        await limiter.acquire(KEY)
        assert (await store.get(job.id)).request == {"a": 1}
    finally:
        await limiter.close()
        await store.close()


# --- Redis only --------------------------------------------------------------------------------------


async def test_redis_windows_expire(redis_server: RedisServer, clock: FakeClock) -> None:
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    limiter = RedisRateLimiter(
        redis_server.url(0), requests_per_minute=5, tokens_per_minute=100, clock=clock, prefix=prefix
    )
    await limiter.open()
    try:
        await limiter.acquire("a")
        clock.now += 60
        await limiter.charge_tokens("b", 7)
    finally:
        await limiter.close()
    with closing(redis.Redis.from_url(redis_server.url(0), decode_responses=True)) as raw:
        base = int(clock.now // 60)
        old, new = f"{prefix}:ratelimit:{key_digest('a')}:{base - 1}", f"{prefix}:ratelimit:{key_digest('b')}:{base}"
        keys = sorted(raw.scan_iter(match=f"{prefix}:*"))
        assert keys == sorted([old, new])
        assert raw.hgetall(old) == {"requests": "1"} and raw.hgetall(new) == {"tokens": "7"}
        assert all(0 < raw.ttl(k) <= 2 * WINDOW_S for k in keys)  # Redis prunes old windows itself
        raw.delete(*keys)


async def test_redis_shares_server_with_job_store(redis_server: RedisServer, clock: FakeClock) -> None:
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    store = RedisJobStore.from_url(redis_server.url(0), prefix=prefix)
    limiter = RedisRateLimiter(
        redis_server.url(0), requests_per_minute=1, tokens_per_minute=0, clock=clock, prefix=prefix
    )
    await store.open()
    await limiter.open()
    try:
        job = await store.create({"a": 1}, request_id=None)
        await limiter.acquire(KEY)
        assert (await store.get(job.id)).request == {"a": 1} and await store.count(job.state) == 1
        assert [j.id for j in await store.list()] == [job.id]
    finally:
        await limiter.close()
        with closing(redis.Redis.from_url(redis_server.url(0))) as raw:
            raw.delete(*raw.scan_iter(match=f"{prefix}:*"))
        await store.close()


async def test_redis_open_unreachable_names_setting() -> None:
    limiter = RedisRateLimiter(
        f"redis://:hunter2@127.0.0.1:{free_port()}/0", requests_per_minute=1, tokens_per_minute=0
    )
    with pytest.raises(ConfigError) as info:
        await limiter.open()
    await limiter.close()
    assert "TEXTGEN_JOB_STORE" in str(info.value) and "hunter2" not in str(info.value)
    assert "hunter2" not in repr(limiter)


# --- factory -----------------------------------------------------------------------------------------


def test_factory_no_limits() -> None:
    assert isinstance(rate_limiter_from_settings(Settings(rate_limit_rpm=0, rate_limit_tpm=0)), NoRateLimit)
    # with no limits the store URL is not even looked at
    settings = Settings(rate_limit_rpm=0, rate_limit_tpm=0, job_store="redis://localhost/0")
    assert isinstance(rate_limiter_from_settings(settings), NoRateLimit)


@pytest.mark.parametrize(("rpm", "tpm"), [(5, 0), (0, 100), (5, 100)])
def test_factory_sqlite_on_job_store_path(tmp_path: Path, rpm: int, tpm: int) -> None:
    settings = Settings(rate_limit_rpm=rpm, rate_limit_tpm=tpm, job_store=f"sqlite:///{tmp_path}/jobs.db")
    limiter = rate_limiter_from_settings(settings)
    assert isinstance(limiter, SQLiteRateLimiter) and limiter.path == tmp_path / "jobs.db"


def test_factory_relative_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    limiter = rate_limiter_from_settings(Settings(rate_limit_rpm=1, job_store="sqlite:///data/jobs.db"))
    assert isinstance(limiter, SQLiteRateLimiter) and limiter.path == tmp_path / "data" / "jobs.db"


@pytest.mark.parametrize("url", ["redis://localhost:6379/0", "rediss://user:secret@host/1", " redis://h "])
def test_factory_redis_on_job_store_server(url: str) -> None:
    limiter = rate_limiter_from_settings(Settings(rate_limit_rpm=10, job_store=url))
    assert isinstance(limiter, RedisRateLimiter) and limiter.prefix == "textgen"
    assert "secret" not in repr(limiter)


async def test_factory_redis_limiter_works(redis_server: RedisServer) -> None:
    limiter = rate_limiter_from_settings(Settings(rate_limit_rpm=1, job_store=redis_server.url(0)))
    key = f"factory-{uuid.uuid4().hex}"  # the default prefix is shared: a key no other test uses
    await limiter.open()
    try:
        await limiter.acquire(key)
        with pytest.raises(RateLimitedError):
            await limiter.acquire(key)
    finally:
        await limiter.close()
        with closing(redis.Redis.from_url(redis_server.url(0))) as raw:
            raw.delete(*raw.scan_iter(match=f"textgen:ratelimit:{key_digest(key)}:*"))


@pytest.mark.parametrize(
    "url", ["sqlite:///:memory:", "jobs.db", "redis://:secret@host:notaport/0", "postgresql://u:secret@db/x"]
)
def test_factory_rejects_unusable_urls(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        rate_limiter_from_settings(Settings(rate_limit_rpm=10, job_store=url))
    assert "TEXTGEN_JOB_STORE" in str(info.value) and "secret" not in str(info.value)


async def test_a_quiet_refusal_is_logged_only_at_debug(make: LimiterFactory, caplog: pytest.LogCaptureFixture) -> None:
    """The batch coordinator retries a paced line at every poll: its refusals must not flood INFO."""
    limiter = await _opened(make(tpm=10))
    await limiter.reserve(KEY, 10)
    with caplog.at_level(logging.DEBUG, logger="textgen.ratelimit"):
        for quiet in (True, False):
            with pytest.raises(RateLimitedError):
                await limiter.reserve(KEY, 1, quiet=quiet)
    levels = [record.levelno for record in caplog.records if "Rate limited" in record.getMessage()]
    assert levels == [logging.DEBUG, logging.INFO]
