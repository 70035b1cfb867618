"""The one Redis client helper: building a client from the store URL, connecting with a fix hint,
the outage guard (connection errors -> ``StoreUnavailableError``, a 503 with ``Retry-After``) and the
durability check at start-up. The job store, the batch store and the rate limiter use it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import redis.asyncio
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from textgen.errors import ConfigError, StoreUnavailableError
from textgen.storage.conditions import CONDITIONS, redis_condition
from textgen.storage.url import check_redis_url, hide_password, invalid_redis_url, redact_url

logger = logging.getLogger(__name__)

_CONNECT_TIMEOUT_S = 5.0
VOLATILE_SETTING = "TEXTGEN_REDIS_ALLOW_VOLATILE"
_warned_volatile: set[str] = set()


def redis_client(url: str) -> redis.asyncio.Redis:
    """A client (no connection made yet) for a ``redis://`` / ``rediss://`` URL; ConfigError if malformed."""
    check_redis_url(url)
    try:
        # Options in the URL's query string win over these defaults. No automatic retries: the scripts
        # are not idempotent (a retried claim whose first reply was lost would take a second job); a
        # failed call surfaces, and a lost claim or finish is recovered by the lease instead.
        return redis.asyncio.Redis.from_url(
            url, decode_responses=True, socket_connect_timeout=_CONNECT_TIMEOUT_S, retry=Retry(NoBackoff(), 0)
        )
    except ValueError as exc:
        raise invalid_redis_url(url, hide_password(str(exc), url)) from None


def _open_failure(url: str, exc: redis.exceptions.RedisError) -> ConfigError:
    shown = redact_url(url)
    reason = hide_password(str(exc), url)
    if isinstance(exc, redis.exceptions.AuthenticationError) or "NOAUTH" in reason or "WRONGPASS" in reason:
        fix = (
            "authentication failed. Put the right password in TEXTGEN_JOB_STORE (redis://:password@host:port/db, "
            "or redis://user:password@host:port/db for an ACL user)"
        )
    elif "DB index is out of range" in reason:
        fix = (
            "that database number does not exist on the server. Use a db from 0 to the server's `databases` "
            "setting minus one in TEXTGEN_JOB_STORE (redis://host:port/0)"
        )
    elif isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        fix = (
            "the server is not reachable. Start Redis there, or fix the host and port in TEXTGEN_JOB_STORE "
            "(and use rediss:// if the server only accepts TLS)"
        )
    else:
        fix = "the server refused the connection. Check the server and TEXTGEN_JOB_STORE"
    return ConfigError(f"Cannot use Redis at {shown}: {fix}. ({reason})")


@contextlib.asynccontextmanager
async def redis_outage_guard(
    url: str, what: str, *, write: bool = True, client: redis.asyncio.Redis | None = None
) -> AsyncIterator[None]:
    """An unreachable server is a retryable 503 for clients (StoreUnavailableError), not a 500; a server
    refusing writes (out of memory, failed snapshot) is a 507 naming the fix. The job store, the batch
    store and the rate limiter all call Redis through this, so a condition is logged once per server
    (``CONDITIONS``). ``write``: the block writes, so its success clears a write-refusal condition.
    ``client``: its idle connections are dropped on a connection error, so that after a restart of the
    server each of them does not fail once more (and the outage does not seem to start again)."""
    shown = redact_url(url)
    try:
        yield
    except redis.exceptions.ResponseError as exc:
        mapped = redis_condition(exc, shown)
        if mapped is None:
            raise
        CONDITIONS.enter(f"redis {shown}", type(exc).__name__, mapped.message, writes_only=True)
        raise mapped from exc
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        if client is not None:
            await client.connection_pool.disconnect(inuse_connections=False)
        CONDITIONS.enter(
            f"redis {shown}",
            "unreachable",
            f"Redis at {shown} is unreachable ({type(exc).__name__}: {hide_password(str(exc), url)}): job, batch "
            "and rate-limited requests answer 503 until it is back. Start the server, or fix TEXTGEN_JOB_STORE.",
        )
        if what == "job store":
            raise StoreUnavailableError() from exc
        raise StoreUnavailableError(
            f"The {what} is unavailable right now; retry after the time in the Retry-After header."
        ) from exc
    else:
        CONDITIONS.clear(f"redis {shown}", wrote=write)


async def ping_redis(client: redis.asyncio.Redis, url: str) -> None:
    """Connect and PING; ConfigError, naming TEXTGEN_JOB_STORE and saying how to fix it, if that fails."""
    try:
        await client.ping()
    except redis.exceptions.RedisError as exc:
        raise _open_failure(url, exc) from None


async def check_durability(client: redis.asyncio.Redis, url: str, *, allow_volatile: bool) -> str:
    """Read the server's persistence settings (``appendonly``, ``appendfsync``) and refuse a server that
    would lose acknowledged jobs in a crash: ConfigError without AOF, unless ``allow_volatile`` (then one
    warning per URL and process). Returns a short description of what the server guarantees."""
    try:
        config = await client.config_get("append*")
    except redis.exceptions.ResponseError:  # CONFIG is disabled on some managed servers
        logger.warning(
            "Cannot read the persistence settings of Redis at %s (CONFIG GET refused): make sure it runs with "
            "appendonly yes, or accepted jobs are lost when it restarts.",
            redact_url(url),
        )
        return "unknown (CONFIG GET refused)"
    appendonly = str(config.get("appendonly", "no")).lower()
    fsync = str(config.get("appendfsync", "everysec")).lower()
    if appendonly != "yes":
        problem = (
            f"Redis at {redact_url(url)} runs without its append-only file (appendonly {appendonly}): a restart "
            "or crash loses every job accepted since its last snapshot. Set `appendonly yes` (and "
            "`appendfsync everysec` or `always`) in redis.conf or with CONFIG SET, or accept the risk with "
            f"{VOLATILE_SETTING}=true"
        )
        if not allow_volatile:
            raise ConfigError(problem + ".")
        if url not in _warned_volatile:
            _warned_volatile.add(url)
            logger.warning("%s (set: jobs may be lost).", problem)
        return "volatile"
    if fsync == "no":
        logger.warning(
            "Redis at %s: appendfsync no leaves flushing to the OS (typically up to 30 s of acknowledged jobs "
            "can be lost in a power cut); everysec risks about 1 s, always none.",
            redact_url(url),
        )
    return f"appendonly yes, appendfsync {fsync}"
