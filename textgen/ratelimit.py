"""Per-API-key rate limits: requests per minute and tokens (prompt + generated) per minute.

Counts live in fixed one-minute windows (``window = int(now // 60)``) where the job store lives, so the
limits hold across every process sharing it: a table of the job store's SQLite file, updated in
``BEGIN IMMEDIATE`` transactions (``SQLiteRateLimiter``), or, with a ``redis://`` job store, one hash
per key and window updated by a Lua script and expiring once its window is over
(``RedisRateLimiter``). ``acquire`` counts a request or refuses it (``RateLimitedError`` with
``retry_after_s`` = seconds until the window ends; a refused request is not counted); ``reserve``
takes a request's whole token budget (its prompt tokens plus the most it may generate) up front, with
the request itself counted in the same atomic step when asked, or refuses it before any work is done;
``refund`` gives back what the request did not use once it ended (in the window it was reserved in; a
later window starts from zero anyway). ``available_tokens`` says how much of the window is left (a
request that names no output limit is granted what fits). ``charge_tokens`` adds tokens after the
fact (kept for callers that cannot know a budget). A Redis outage is a ``StoreUnavailableError``
(503 + ``Retry-After``), as in the Redis job store.

Keys are API keys: they are stored and logged only as sha256 digests, never in clear.
"""

from __future__ import annotations

import hashlib
import logging
import math
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from redis.commands.core import AsyncScript

from textgen.errors import RateLimitedError
from textgen.storage.lua import lua_scripts
from textgen.storage.redis import ping_redis, redis_client, redis_outage_guard
from textgen.storage.sqlite import SQLiteConnection, connect_sqlite, write_txn
from textgen.storage.url import redact_url

logger = logging.getLogger(__name__)

WINDOW_S = 60

_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS rate_limits (
        key_hash TEXT NOT NULL,
        win      INTEGER NOT NULL,
        requests INTEGER NOT NULL DEFAULT 0,
        tokens   INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (key_hash, win)
    )
    """,
    "CREATE INDEX IF NOT EXISTS rate_limits_window ON rate_limits (win)",
)

_UPSERT = (
    "INSERT INTO rate_limits (key_hash, win, requests, tokens) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (key_hash, win) DO UPDATE SET "
    "requests = requests + excluded.requests, tokens = tokens + excluded.tokens"
)


@dataclass(frozen=True)
class Reservation:
    """Tokens reserved for ``digest`` (a key's sha256) in one window; ``prompt_tokens`` of them are the
    prompts' share, spent once the request reaches the engine (only the unused output is refunded)."""

    digest: str
    window: int
    tokens: int
    prompt_tokens: int = 0

    def encode(self) -> str:
        """The stored form (a job keeps its submitter's reservation until it ends)."""
        base = f"{self.window}:{self.tokens}:{self.digest}"
        return f"{base}:{self.prompt_tokens}" if self.prompt_tokens else base

    @classmethod
    def decode(cls, text: str | None) -> Reservation | None:
        if not text:
            return None
        window, tokens, digest, *prompt = text.split(":")  # a digest is hex: no colon in it
        return cls(digest, int(window), int(tokens), int(prompt[0]) if prompt else 0)


@runtime_checkable
class RateLimiter(Protocol):
    """Per-key request and token budgets."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def acquire(self, key: str) -> None: ...

    async def reserve(
        self, key: str, tokens: int, *, requests: int = 0, prompt_tokens: int = 0, quiet: bool = False
    ) -> Reservation | None:
        """Reserve ``tokens`` of ``key``'s token budget and count ``requests`` requests, both or
        neither (RateLimitedError when either does not fit); None when no tokens needed reserving (no
        token limit, or 0 tokens). ``prompt_tokens`` (part of ``tokens``) is recorded on the reservation.
        ``quiet``: a refusal is logged at DEBUG (a caller that retries and logs its own waiting)."""

    async def refund(self, reservation: Reservation | None, unused: int) -> None: ...

    async def charge_tokens(self, key: str, tokens: int) -> None: ...

    async def available_tokens(self, key: str) -> int | None:
        """Tokens ``key`` may still reserve in the current window; None when there is no token limit."""

    @property
    def tokens_per_minute(self) -> int:
        """The token limit (0 = none)."""


def key_digest(key: str) -> str:
    """sha256 (hex) of a key: what is stored; log only a short prefix of it."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


class NoRateLimit:
    """``RateLimiter`` that never refuses (both limits are 0)."""

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def acquire(self, key: str) -> None:
        return None

    async def reserve(
        self, key: str, tokens: int, *, requests: int = 0, prompt_tokens: int = 0, quiet: bool = False
    ) -> Reservation | None:
        return None

    async def refund(self, reservation: Reservation | None, unused: int) -> None:
        return None

    async def charge_tokens(self, key: str, tokens: int) -> None:
        return None

    async def available_tokens(self, key: str) -> int | None:
        return None

    @property
    def tokens_per_minute(self) -> int:
        return 0


# --------------------------------------------------------------------------------------------------
# SQLite implementation (functions run on the limiter's connection, in a worker thread)
# --------------------------------------------------------------------------------------------------


def _counts(conn: sqlite3.Connection, key_hash: str, window: int) -> tuple[int, int]:
    row = conn.execute(
        "SELECT requests, tokens FROM rate_limits WHERE key_hash = ? AND win = ?", (key_hash, window)
    ).fetchone()
    return (0, 0) if row is None else (int(row[0]), int(row[1]))


def _over_limit(requests: int, tokens: int, rpm: int, tpm: int, add_requests: int, add_tokens: int) -> str | None:
    """Which budget adding ``add_requests`` / ``add_tokens`` would overrun ("requests", "tokens", or
    "budget" for tokens that could never fit in one window), or None."""
    if add_requests and rpm > 0 and requests + add_requests > rpm:
        return "requests"
    if add_tokens and tpm > 0:
        if add_tokens > tpm:
            return "budget"
        if tokens + add_tokens > tpm:
            return "tokens"
    return None


def _acquire(
    conn: sqlite3.Connection, key_hash: str, window: int, rpm: int, tpm: int, add_requests: int, add_tokens: int
) -> str | None:
    """Count requests and reserve tokens in ``window`` unless that overruns a budget; returns the
    overrun budget, if any (and then counts nothing)."""
    with write_txn(conn):
        conn.execute("DELETE FROM rate_limits WHERE win < ?", (window - 1,))  # old windows, any key
        spent = _over_limit(*_counts(conn, key_hash, window), rpm, tpm, add_requests, add_tokens)
        if spent is None:
            conn.execute(_UPSERT, (key_hash, window, add_requests, add_tokens))
    return spent


def _refund(conn: sqlite3.Connection, key_hash: str, window: int, tokens: int) -> None:
    conn.execute(
        "UPDATE rate_limits SET tokens = MAX(0, tokens - ?) WHERE key_hash = ? AND win = ?", (tokens, key_hash, window)
    )


def _charge(conn: sqlite3.Connection, key_hash: str, window: int, tokens: int) -> None:
    conn.execute(_UPSERT, (key_hash, window, 0, tokens))  # one statement: atomic in autocommit mode


def _retry_after_s(now: float, window: int) -> int:
    """Whole seconds until ``window`` ends, at least 1."""
    return max(1, math.ceil((window + 1) * WINDOW_S - now))


class TokenBudgetTooLargeError(RateLimitedError):
    """A request whose token budget is larger than a whole window's: waiting would never help."""


def budget_refusal(tokens: int, tpm: int, retry_after_s: int = WINDOW_S) -> TokenBudgetTooLargeError:
    """A request whose budget could never fit in one window, however long it waited."""
    return TokenBudgetTooLargeError(
        f"Rate limit exceeded: this request needs up to {tokens} tokens (its prompt plus the most it may generate), "
        f"more than the {tpm} tokens per minute this API key may use (TEXTGEN_RATE_LIMIT_TPM), so it can never "
        "run; ask for fewer tokens (max_new_tokens / max_tokens, or n) or send a shorter prompt.",
        retry_after_s=retry_after_s,
    )


def _refusal(spent: str, rpm: int, tpm: int, tokens: int, retry_after_s: int) -> RateLimitedError:
    if spent == "budget":
        return budget_refusal(tokens, tpm, retry_after_s)
    if spent == "requests":
        what, setting = f"{rpm} requests per minute", "TEXTGEN_RATE_LIMIT_RPM"
    else:
        what = f"{tpm} tokens per minute (prompt + generated; this request reserves {tokens})"
        setting = "TEXTGEN_RATE_LIMIT_TPM"
    return RateLimitedError(
        f"Rate limit exceeded: this API key has used its {what} ({setting}). Retry after {retry_after_s} s.",
        retry_after_s=retry_after_s,
    )


class WindowedRateLimiter:
    """Fixed one-minute windows per key digest; the backends only count (``_count``: check and count
    atomically, returning the overrun budget if any; ``_add_tokens``; ``_refund``; ``_tokens_used``)."""

    def __init__(self, *, requests_per_minute: int, tokens_per_minute: int, clock: Callable[[], float]) -> None:
        if requests_per_minute < 0 or tokens_per_minute < 0:
            raise ValueError("requests_per_minute and tokens_per_minute must be >= 0 (0 = unlimited)")
        self._rpm = requests_per_minute
        self._tpm = tokens_per_minute
        self.clock = clock  # tests move it to the next window instead of waiting for it

    async def _count(self, digest: str, window: int, requests: int, tokens: int) -> str | None:
        raise NotImplementedError

    async def _add_tokens(self, digest: str, window: int, tokens: int) -> None:
        raise NotImplementedError

    async def _refund(self, digest: str, window: int, tokens: int) -> None:
        raise NotImplementedError

    async def _tokens_used(self, digest: str, window: int) -> int:
        raise NotImplementedError

    @property
    def tokens_per_minute(self) -> int:
        return self._tpm

    async def _take(self, key: str, requests: int, tokens: int, quiet: bool = False) -> tuple[str, int]:
        now = self.clock()
        window = int(now // WINDOW_S)
        digest = key_digest(key)
        spent = await self._count(digest, window, requests, tokens)
        if spent is None:
            return digest, window
        retry_after_s = _retry_after_s(now, window)
        logger.log(
            logging.DEBUG if quiet else logging.INFO,
            "Rate limited key sha256:%s (%s per minute), retry in %d s",
            digest[:12],
            spent,
            retry_after_s,
        )
        raise _refusal(spent, self._rpm, self._tpm, tokens, retry_after_s)

    async def acquire(self, key: str) -> None:
        """Count one request for ``key``; RateLimitedError (not counted) if its request budget is spent."""
        if self._rpm > 0:
            await self._take(key, 1, 0)

    async def reserve(
        self, key: str, tokens: int, *, requests: int = 0, prompt_tokens: int = 0, quiet: bool = False
    ) -> Reservation | None:
        """Reserve ``tokens`` in the current window and count ``requests`` requests in one atomic step;
        RateLimitedError (nothing reserved or counted) if either does not fit. None when there is no
        token limit or nothing to reserve (the requests are still counted)."""
        if tokens < 0 or requests < 0 or not 0 <= prompt_tokens <= tokens:
            raise ValueError(f"bad reservation: tokens={tokens} prompt_tokens={prompt_tokens} requests={requests}")
        counted_requests = requests if self._rpm > 0 else 0
        reserved = tokens if self._tpm > 0 else 0
        if not counted_requests and not reserved:
            return None
        digest, window = await self._take(key, counted_requests, reserved, quiet)
        return Reservation(digest, window, tokens, prompt_tokens) if reserved else None

    async def available_tokens(self, key: str) -> int | None:
        """Tokens ``key`` may still reserve in the current window (a snapshot: ``reserve`` decides)."""
        if self._tpm == 0:
            return None
        used = await self._tokens_used(key_digest(key), int(self.clock() // WINDOW_S))
        return max(0, self._tpm - used)

    async def refund(self, reservation: Reservation | None, unused: int) -> None:
        """Give back ``unused`` reserved tokens while the reservation's window lasts (after that the
        window is over and its count no longer matters)."""
        if reservation is None or unused <= 0:
            return
        if int(self.clock() // WINDOW_S) != reservation.window:
            return
        await self._refund(reservation.digest, reservation.window, min(unused, reservation.tokens))

    async def charge_tokens(self, key: str, tokens: int) -> None:
        """Add ``tokens`` generated for ``key`` to its current window (nothing to do when 0)."""
        if tokens < 0:
            raise ValueError(f"tokens must be >= 0, got {tokens}")
        if tokens == 0 or self._tpm == 0:
            return
        await self._add_tokens(key_digest(key), int(self.clock() // WINDOW_S), tokens)


class SQLiteRateLimiter(WindowedRateLimiter):
    """``RateLimiter`` on a table of the job store's SQLite file, shared by all worker processes.

    One connection per object, used from worker threads one call at a time.
    """

    def __init__(
        self,
        path: Path,
        *,
        requests_per_minute: int,
        tokens_per_minute: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(requests_per_minute=requests_per_minute, tokens_per_minute=tokens_per_minute, clock=clock)
        self._db = SQLiteConnection(Path(path), lambda file: connect_sqlite(file, _SCHEMA), role="rate limits")
        self._run = self._db.run

    @property
    def path(self) -> Path:
        return self._db.path

    def __repr__(self) -> str:
        return f"SQLiteRateLimiter({str(self.path)!r}, rpm={self._rpm}, tpm={self._tpm})"

    async def open(self) -> None:
        await self._db.open()
        logger.info("Rate limits (rpm=%d, tpm=%d) kept in %s", self._rpm, self._tpm, self.path)

    async def close(self) -> None:
        await self._db.close()

    async def _count(self, digest: str, window: int, requests: int, tokens: int) -> str | None:
        return await self._run(_acquire, digest, window, self._rpm, self._tpm, requests, tokens)

    async def _add_tokens(self, digest: str, window: int, tokens: int) -> None:
        await self._run(_charge, digest, window, tokens)

    async def _refund(self, digest: str, window: int, tokens: int) -> None:
        await self._run(_refund, digest, window, tokens)

    async def _tokens_used(self, digest: str, window: int) -> int:
        return (await self._run(_counts, digest, window))[1]


# --------------------------------------------------------------------------------------------------
# Redis implementation
# --------------------------------------------------------------------------------------------------

# Check-and-count and give-back, each one script (``lua/ratelimit_*.lua``), atomic across replicas.
_LUA = lua_scripts(Path(__file__).parent / "lua", ("ratelimit_acquire", "ratelimit_refund"))

# A window's counts are read only during that window; Redis drops them a window later (the SQLite
# table likewise keeps the previous window), so a slow clock on one replica still finds them.
_REDIS_EXPIRY_S = 2 * WINDOW_S


class RedisRateLimiter(WindowedRateLimiter):
    """``RateLimiter`` on the Redis server of a ``redis://`` job store, shared by every replica.

    Key ``{prefix}:ratelimit:{sha256 of the API key}:{window}``: a hash of ``requests`` and ``tokens``.
    Windows come from this process's clock (``clock``), as in SQLite; replicas whose clocks differ by
    a few seconds disagree on the window only around its edges.
    """

    def __init__(
        self,
        url: str,
        *,
        requests_per_minute: int,
        tokens_per_minute: int,
        clock: Callable[[], float] = time.time,
        prefix: str = "textgen",
    ) -> None:
        super().__init__(requests_per_minute=requests_per_minute, tokens_per_minute=tokens_per_minute, clock=clock)
        self._url = url
        self.prefix = prefix
        self._redis = redis_client(url)
        self._acquire: AsyncScript = self._redis.register_script(_LUA["ratelimit_acquire"])
        self._refund_script: AsyncScript = self._redis.register_script(_LUA["ratelimit_refund"])
        self._opened = False

    @property
    def url(self) -> str:
        """The URL with any password hidden."""
        return redact_url(self._url)

    def __repr__(self) -> str:
        return f"RedisRateLimiter({self.url!r}, prefix={self.prefix!r}, rpm={self._rpm}, tpm={self._tpm})"

    async def open(self) -> None:
        await ping_redis(self._redis, self._url)
        self._opened = True
        logger.info("Rate limits (rpm=%d, tpm=%d) kept in Redis at %s", self._rpm, self._tpm, self.url)

    async def close(self) -> None:
        self._opened = False
        await self._redis.aclose()

    def _window_key(self, digest: str, window: int) -> str:
        if not self._opened:
            raise RuntimeError(f"The Redis rate limiter at {self.url} is not open; call open() first.")
        return f"{self.prefix}:ratelimit:{digest}:{window}"

    async def _count(self, digest: str, window: int, requests: int, tokens: int) -> str | None:
        redis_key = self._window_key(digest, window)
        async with redis_outage_guard(self._url, "rate limiter", client=self._redis):
            spent: str | None = await self._acquire(
                keys=[redis_key], args=[self._rpm, self._tpm, _REDIS_EXPIRY_S, requests, tokens]
            )
        return spent

    async def _add_tokens(self, digest: str, window: int, tokens: int) -> None:
        redis_key = self._window_key(digest, window)
        guard = redis_outage_guard(self._url, "rate limiter", client=self._redis)
        async with guard, self._redis.pipeline(transaction=True) as pipe:
            pipe.hincrby(redis_key, "tokens", tokens)  # MULTI: never a count without its expiry
            pipe.expire(redis_key, _REDIS_EXPIRY_S)
            await pipe.execute()

    async def _refund(self, digest: str, window: int, tokens: int) -> None:
        async with redis_outage_guard(self._url, "rate limiter", client=self._redis):
            await self._refund_script(keys=[self._window_key(digest, window)], args=[tokens])

    async def _tokens_used(self, digest: str, window: int) -> int:
        redis_key = self._window_key(digest, window)
        async with redis_outage_guard(self._url, "rate limiter"):
            used = await self._redis.hget(redis_key, "tokens")
        return int(used or 0)
