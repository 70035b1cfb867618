"""Unit tests for per-key rate limits (``textgen.ratelimit``), SQLite implementation."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from textgen.config import Settings
from textgen.errors import ConfigError, RateLimitedError
from textgen.jobs.sqlite_store import SQLiteJobStore
from textgen.ratelimit import (
    NoRateLimit,
    RateLimiter,
    SQLiteRateLimiter,
    key_digest,
    rate_limiter_from_settings,
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


LimiterFactory = Callable[..., SQLiteRateLimiter]


@pytest.fixture
async def make(tmp_path: Path, clock: FakeClock) -> AsyncIterator[LimiterFactory]:
    opened: list[SQLiteRateLimiter] = []

    def factory(rpm: int = 0, tpm: int = 0, path: Path | None = None) -> SQLiteRateLimiter:
        limiter = SQLiteRateLimiter(
            path or tmp_path / "jobs.db", requests_per_minute=rpm, tokens_per_minute=tpm, clock=clock
        )
        opened.append(limiter)
        return limiter

    yield factory
    for limiter in opened:
        await limiter.close()


async def _opened(limiter: SQLiteRateLimiter) -> SQLiteRateLimiter:
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


async def test_refused_requests_not_counted(make: LimiterFactory, tmp_path: Path) -> None:
    limiter = await _opened(make(rpm=2))
    await limiter.acquire(KEY)
    await limiter.acquire(KEY)
    for _ in range(5):
        with pytest.raises(RateLimitedError):
            await limiter.acquire(KEY)
    with sqlite3.connect(tmp_path / "jobs.db") as conn:
        assert conn.execute("SELECT requests FROM rate_limits").fetchall() == [(2,)]


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
        await limiter.acquire(KEY)
    clock.now += 60
    await limiter.acquire(KEY)
    await limiter.acquire(KEY)
    with pytest.raises(RateLimitedError):
        await limiter.acquire(KEY)


async def test_tpm_refuses_after_charge(make: LimiterFactory) -> None:
    limiter = await _opened(make(tpm=10))
    await limiter.acquire(KEY)
    await limiter.charge_tokens(KEY, 9)
    await limiter.acquire(KEY)  # 9 < 10: still allowed
    await limiter.charge_tokens(KEY, 1)
    with pytest.raises(RateLimitedError) as info:
        await limiter.acquire(KEY)
    msg = info.value.message
    assert "tokens per minute" in msg and "TEXTGEN_RATE_LIMIT_TPM" in msg and KEY not in msg
    assert info.value.retry_after_s is not None and 1 <= info.value.retry_after_s <= 60
    await limiter.acquire("other")  # token budgets are per key too


async def test_charge_tokens_validates(make: LimiterFactory) -> None:
    limiter = await _opened(make(tpm=10))
    await limiter.charge_tokens(KEY, 0)
    with pytest.raises(ValueError, match="tokens"):
        await limiter.charge_tokens(KEY, -1)
    await limiter.acquire(KEY)


async def test_two_limiters_share_counts(make: LimiterFactory, tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    a = await _opened(make(rpm=4, tpm=100, path=path))
    b = await _opened(make(rpm=4, tpm=100, path=path))
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
        await a.acquire("t")


async def test_concurrent_acquires_exact(make: LimiterFactory, tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    limiters = [await _opened(make(rpm=7, path=path)) for _ in range(3)]
    outcomes = await asyncio.gather(*(limiters[i % 3].acquire(KEY) for i in range(30)), return_exceptions=True)
    assert sum(o is None for o in outcomes) == 7
    assert all(isinstance(o, RateLimitedError) for o in outcomes if o is not None)


_ACQUIRER = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from textgen.errors import RateLimitedError
    from textgen.ratelimit import SQLiteRateLimiter

    async def main() -> None:
        limiter = SQLiteRateLimiter(Path(sys.argv[1]), requests_per_minute=25, tokens_per_minute=0,
                                    clock=lambda: 6_000_010.0)
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


async def test_limit_holds_across_processes(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", _ACQUIRER, str(path), cwd=REPO_ROOT, stdout=subprocess.PIPE
        )
        for _ in range(3)
    ]
    outs = [await p.communicate() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0]
    assert sum(int(out) for out, _ in outs) == 25


async def test_old_windows_pruned(make: LimiterFactory, clock: FakeClock, tmp_path: Path) -> None:
    limiter = await _opened(make(rpm=5))
    await limiter.acquire("a")
    clock.now += 60
    await limiter.acquire("b")  # previous window kept (window - 1)
    clock.now += 60
    await limiter.acquire("c")  # the first window (now - 2) is deleted
    with sqlite3.connect(tmp_path / "jobs.db") as conn:
        rows = conn.execute("SELECT key_hash, win FROM rate_limits ORDER BY win").fetchall()
    base = int(clock.now // 60)
    assert rows == [(key_digest("b"), base - 1), (key_digest("c"), base)]


async def test_keys_never_stored_or_logged(
    make: LimiterFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    limiter = await _opened(make(rpm=1))
    caplog.set_level(logging.DEBUG, logger="textgen")
    await limiter.acquire(KEY)
    with pytest.raises(RateLimitedError):
        await limiter.acquire(KEY)
    assert KEY not in caplog.text and key_digest(KEY)[:12] in caplog.text
    assert KEY.encode() not in (tmp_path / "jobs.db").read_bytes()


async def test_shares_file_with_job_store(make: LimiterFactory, tmp_path: Path) -> None:
    store = SQLiteJobStore(tmp_path / "jobs.db")
    await store.open()
    limiter = await _opened(make(rpm=1))
    job = await store.create({"a": 1}, request_id=None)
    await limiter.acquire(KEY)
    assert (await store.get(job.id)).request == {"a": 1}
    await store.close()


async def test_acquire_before_open_fails(make: LimiterFactory) -> None:
    with pytest.raises(RuntimeError, match="not open"):
        await make(rpm=1).acquire(KEY)


def test_negative_limits_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        SQLiteRateLimiter(tmp_path / "x.db", requests_per_minute=-1, tokens_per_minute=0)


async def test_no_rate_limit_never_raises() -> None:
    limiter = NoRateLimit()
    assert isinstance(limiter, RateLimiter)
    await limiter.open()
    for _ in range(1000):
        await limiter.acquire(KEY)
    await limiter.charge_tokens(KEY, 10**9)
    await limiter.acquire(KEY)
    await limiter.close()


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


@pytest.mark.parametrize(
    "url", ["redis://localhost:6379/0", "rediss://user:secret@host/1", "sqlite:///:memory:", "jobs.db"]
)
def test_factory_rejects_non_file_urls(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        rate_limiter_from_settings(Settings(rate_limit_rpm=10, job_store=url))
    assert "TEXTGEN_JOB_STORE" in str(info.value) and "secret" not in str(info.value)
