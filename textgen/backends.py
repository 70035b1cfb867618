"""The one factory: the job store, the batch store and the rate limiter, all built from one parsed
``TEXTGEN_JOB_STORE``.

SQLite URL: ``SQLiteJobStore``, ``SQLiteBatchStore`` and (when a limit is set) ``SQLiteRateLimiter``, each
on its own tables of the same file. Redis URL: ``RedisJobStore``, ``RedisBatchStore`` and
``RedisRateLimiter`` on the same server. Both limits 0: ``NoRateLimit``. Every malformed URL is a
``ConfigError`` from ``textgen.storage.url``.
"""

from __future__ import annotations

from dataclasses import dataclass

from textgen.batches.redis_store import RedisBatchStore
from textgen.batches.sqlite_store import SQLiteBatchStore
from textgen.batches.store import BatchStore
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
    batches: BatchStore
    rate_limiter: RateLimiter

    async def open(self) -> None:
        """The job store first (it fails fast with a fix hint), then the limiter and the batch store;
        whatever opened is closed again if a later one fails."""
        await self.store.open()
        try:
            await self.rate_limiter.open()
            try:
                await self.batches.open()
            except BaseException:
                await self.rate_limiter.close()
                raise
        except BaseException:
            await self.store.close()
            raise

    async def close(self) -> None:
        await self.batches.close()
        await self.store.close()
        await self.rate_limiter.close()


def job_store_for(url: StoreURL, *, allow_volatile: bool = False) -> JobStore:
    if url.kind == "redis":
        return RedisJobStore(url.url, allow_volatile=allow_volatile)
    assert url.path is not None
    return SQLiteJobStore(url.path)


def batch_store_for(url: StoreURL) -> BatchStore:
    """Beside the job store: tables in the same file, or keys under the same Redis prefix."""
    if url.kind == "redis":
        return RedisBatchStore(url.url)
    assert url.path is not None
    return SQLiteBatchStore(url.path)


def rate_limiter_for(url: StoreURL, *, requests_per_minute: int, tokens_per_minute: int) -> RateLimiter:
    if requests_per_minute == 0 and tokens_per_minute == 0:
        return NoRateLimit()
    if url.kind == "redis":
        return RedisRateLimiter(url.url, requests_per_minute=requests_per_minute, tokens_per_minute=tokens_per_minute)
    assert url.path is not None
    return SQLiteRateLimiter(url.path, requests_per_minute=requests_per_minute, tokens_per_minute=tokens_per_minute)


def build_backends(settings: Settings) -> Backends:
    """Nothing connects yet: ``await backends.open()``."""
    url = parse_store_url(settings.job_store)
    return Backends(
        url,
        job_store_for(url, allow_volatile=settings.redis_allow_volatile),
        batch_store_for(url),
        rate_limiter_for(url, requests_per_minute=settings.rate_limit_rpm, tokens_per_minute=settings.rate_limit_tpm),
    )


def job_store_from_url(url: str, *, allow_volatile: bool = False) -> JobStore:
    """The store named by a ``TEXTGEN_JOB_STORE`` value (tools and tests)."""
    return job_store_for(parse_store_url(url), allow_volatile=allow_volatile)


def batch_store_from_url(url: str) -> BatchStore:
    """The batch store beside the job store named by a ``TEXTGEN_JOB_STORE`` value (tools and tests)."""
    return batch_store_for(parse_store_url(url))


def rate_limiter_from_settings(settings: Settings) -> RateLimiter:
    return build_backends(settings).rate_limiter
