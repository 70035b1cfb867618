"""The one factory: the job store and the rate limiter, both built from one parsed ``TEXTGEN_JOB_STORE``.

SQLite URL: ``SQLiteJobStore`` on the file and, when a limit is set, ``SQLiteRateLimiter`` on a table of
the same file. Redis URL: ``RedisJobStore`` and ``RedisRateLimiter`` on the same server. Both limits 0:
``NoRateLimit``. Every malformed URL is a ``ConfigError`` from ``textgen.storage.url``.
"""

from __future__ import annotations

from dataclasses import dataclass

from textgen.config import Settings
from textgen.jobs.redis_store import RedisJobStore
from textgen.jobs.sqlite_store import SQLiteJobStore
from textgen.jobs.store import JobStore
from textgen.ratelimit import NoRateLimit, RateLimiter, RedisRateLimiter, SQLiteRateLimiter
from textgen.storage.url import StoreURL, parse_store_url


@dataclass(frozen=True)
class Backends:
    url: StoreURL
    store: JobStore
    rate_limiter: RateLimiter


def job_store_for(url: StoreURL, *, allow_volatile: bool = False) -> JobStore:
    if url.kind == "redis":
        return RedisJobStore(url.url, allow_volatile=allow_volatile)
    assert url.path is not None
    return SQLiteJobStore(url.path)


def rate_limiter_for(url: StoreURL, *, requests_per_minute: int, tokens_per_minute: int) -> RateLimiter:
    if requests_per_minute == 0 and tokens_per_minute == 0:
        return NoRateLimit()
    if url.kind == "redis":
        return RedisRateLimiter(url.url, requests_per_minute=requests_per_minute, tokens_per_minute=tokens_per_minute)
    assert url.path is not None
    return SQLiteRateLimiter(url.path, requests_per_minute=requests_per_minute, tokens_per_minute=tokens_per_minute)


def build_backends(settings: Settings) -> Backends:
    """Nothing connects yet: ``open()`` each (the store first: it fails fast with a fix hint)."""
    url = parse_store_url(settings.job_store)
    return Backends(
        url,
        job_store_for(url, allow_volatile=settings.redis_allow_volatile),
        rate_limiter_for(
            url, requests_per_minute=settings.rate_limit_rpm, tokens_per_minute=settings.rate_limit_tpm
        ),
    )


def job_store_from_url(url: str, *, allow_volatile: bool = False) -> JobStore:
    """The store named by a ``TEXTGEN_JOB_STORE`` value (tools and tests)."""
    return job_store_for(parse_store_url(url), allow_volatile=allow_volatile)


def rate_limiter_from_settings(settings: Settings) -> RateLimiter:
    return build_backends(settings).rate_limiter
