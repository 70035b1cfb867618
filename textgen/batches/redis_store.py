"""``BatchStore`` on the job store's Redis server, shared by every replica.

Keys under ``{prefix}:`` (the job store's prefix): ``bfile:{id}`` (a file's JSON), ``bfiles`` and
``bfiles:{owner}`` (zsets by creation time), ``bfusage:{owner}`` (hash: files, bytes: what the owner
keeps, for quotas), ``bfexpiry`` (zset: when each expiring file expires); ``batch:{id}`` (hash: data,
status, cancel_requested_at, lease_owner, lease_until), ``batches`` and ``batches:{owner}`` (zsets by
creation time), ``batches:due`` (zset: when each batch needs a look); per batch ``batch:{id}:all``
(zset of line numbers), ``:cid`` (custom_id -> line, for duplicates), ``:custom`` / ``:jobs`` /
``:outcome`` (line -> custom_id, job id, outcome), ``:open`` (zset: submitted lines without an outcome)
and ``:counts`` (outcome -> n). Lease checks, line and file bookkeeping are Lua scripts (``lua/*.lua``
beside this module), atomic across replicas.

It is built on the shared storage layer like the job store: the same client settings, the same outage
guard (an unreachable server is a 503; a server out of memory or refusing writes a 507, logged once per
server in ``textgen.storage.conditions``), and leases on the server's clock (``TIME``), so replicas whose
clocks disagree still agree on when a lease ran out. Tests inject a clock instead.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, cast

from redis.commands.core import AsyncScript

from textgen.batches.store import (
    ACTIVE_STATUSES,
    Batch,
    BatchNotFoundError,
    FileNotFoundInStoreError,
    FileQuota,
    FileUsage,
    Line,
    LineOutcome,
    StoredFile,
    batch_from_json,
    batch_to_json,
    file_from_json,
    file_to_json,
)
from textgen.storage.lua import lua_scripts
from textgen.storage.redis import ping_redis, redis_client, redis_outage_guard
from textgen.storage.url import redact_url

logger = logging.getLogger(__name__)

_LINE_KEYS = ("all", "cid", "custom", "jobs", "outcome", "open", "counts")
USAGE_BUILT = "bfusage-built"  # set once every file's size is counted in the bfusage:{owner} hashes

_SCRIPTS: dict[str, str] = lua_scripts(
    Path(__file__).parent / "lua",
    ("claim", "save", "release", "request_cancel", "add_lines", "set_jobs", "set_outcomes", "put_file", "delete_file"),
)


class RedisBatchStore:
    def __init__(self, url: str, *, prefix: str = "textgen", clock: Callable[[], float] | None = None) -> None:
        """``clock``: None (the default) puts leases on the Redis server's clock; a callable (tests) is
        read for every lease and timestamp instead."""
        if not prefix:
            raise ValueError("prefix must not be empty")
        self._url = url
        self.prefix = prefix
        self._clock = clock
        self._redis = redis_client(url)
        self._scripts: dict[str, AsyncScript] = {
            name: self._redis.register_script(body) for name, body in _SCRIPTS.items()
        }

    def __repr__(self) -> str:
        return f"RedisBatchStore({redact_url(self._url)!r}, prefix={self.prefix!r})"

    async def open(self) -> None:
        await ping_redis(self._redis, self._url)
        await self._count_usage_once()

    async def _count_usage_once(self) -> None:
        """Files stored by a version without quotas have no usage counted: count them once per Redis
        (the marker says it was done). Done at start-up, before this process uploads anything."""
        async with self._guard(write=True):
            if await self._redis.exists(self._k(USAGE_BUILT)):
                return
            usage: dict[str, list[int]] = {}
            start = 0
            while ids := cast(builtins.list[str], await self._redis.zrange(self._k("bfiles"), start, start + 499)):
                start += len(ids)
                for text in await self._redis.mget([self._k("bfile", file_id) for file_id in ids]):
                    if text is not None:
                        record = file_from_json(cast(str, text))
                        counted = usage.setdefault(record.owner, [0, 0])
                        counted[0] += 1
                        counted[1] += record.bytes
            if not await self._redis.set(self._k(USAGE_BUILT), "1", nx=True):
                return  # another replica counted them meanwhile
            async with self._redis.pipeline(transaction=True) as pipe:
                for owner, (files, size) in usage.items():
                    pipe.hset(self._k("bfusage", owner), mapping={"files": files, "bytes": size})
                await pipe.execute()

    async def close(self) -> None:
        await self._redis.aclose()

    @contextlib.asynccontextmanager
    async def _guard(self, *, write: bool = False) -> AsyncIterator[None]:
        """The job store's outage guard, on the same server (one log line per condition). Plain commands
        here read (so they cannot announce that a server refusing writes takes them again); scripts and
        the ``write=True`` blocks write."""
        async with redis_outage_guard(self._url, "job store", write=write, client=self._redis):
            yield

    def _wall(self) -> float:
        """Timestamps shown to clients and due times: the injected clock, else this machine's."""
        return time.time() if self._clock is None else self._clock()

    def _k(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def _line_key(self, batch_id: str, name: str) -> str:
        return self._k("batch", batch_id, name)

    async def _script(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        async with self._guard(write=True):
            return await self._scripts[name](keys=list(keys), args=list(args))

    # -- files ---------------------------------------------------------------------------------------

    def _file_keys(self, record: StoredFile) -> builtins.list[str]:
        return [
            self._k("bfile", record.id),
            self._k("bfiles"),
            self._k("bfiles", record.owner),
            self._k("bfusage", record.owner),
            self._k("bfexpiry"),
        ]

    def _file_args(self, record: StoredFile, quota: FileQuota | None) -> builtins.list[Any]:
        expires = "" if record.expires_at is None else repr(record.expires_at)
        check = "0" if quota is None else "1"
        limits = (0, 0) if quota is None else (quota.max_files, quota.max_bytes)
        return [
            self.prefix,
            record.id,
            record.owner,
            file_to_json(record),
            record.bytes,
            record.created_at,
            expires,
            check,
            *limits,
        ]

    async def put_file(self, record: StoredFile) -> None:
        await self._script("put_file", self._file_keys(record), self._file_args(record, None))

    async def add_file(self, record: StoredFile, quota: FileQuota) -> bool:
        return bool(await self._script("put_file", self._file_keys(record), self._file_args(record, quota)))

    async def file_usage(self, owner: str) -> FileUsage:
        async with self._guard():
            files, size = await self._redis.hmget(self._k("bfusage", owner), ["files", "bytes"])
        return FileUsage(int(files or 0), int(size or 0))

    async def expired_files(self, now: float, limit: int) -> builtins.list[StoredFile]:
        async with self._guard():
            found = await self._redis.zrangebyscore(self._k("bfexpiry"), "-inf", now, start=0, num=limit)
            ids = cast(builtins.list[str], found)
            if not ids:
                return []
            texts = await self._redis.mget([self._k("bfile", file_id) for file_id in ids])
            gone = [file_id for file_id, text in zip(ids, texts, strict=True) if text is None]
            if gone:  # deleted meanwhile by another process: drop them from the index
                await self._redis.zrem(self._k("bfexpiry"), *gone)
        return [file_from_json(cast(str, text)) for text in texts if text is not None]

    async def get_file(self, file_id: str) -> StoredFile:
        async with self._guard():
            text = await self._redis.get(self._k("bfile", file_id))
        if text is None:
            raise FileNotFoundInStoreError()
        return file_from_json(cast(str, text))  # the client decodes responses

    async def list_files(
        self, owner: str | None, *, purpose: str | None = None, limit: int = 100
    ) -> builtins.list[StoredFile]:
        index = self._k("bfiles") if owner is None else self._k("bfiles", owner)
        found: builtins.list[StoredFile] = []
        start = 0
        async with self._guard():
            while len(found) < limit:
                ids = cast(builtins.list[str], await self._redis.zrevrange(index, start, start + 499))
                if not ids:
                    break
                start += len(ids)
                texts = await self._redis.mget([self._k("bfile", file_id) for file_id in ids])
                for text in texts:
                    if text is not None:
                        record = file_from_json(cast(str, text))
                        if purpose is None or record.purpose == purpose:
                            found.append(record)
        return found[:limit]

    async def delete_file(self, file_id: str) -> bool:
        keys = [self._k("bfile", file_id), self._k("bfiles"), self._k("bfexpiry")]
        return bool(await self._script("delete_file", keys, [self.prefix, file_id]))

    # -- batches -------------------------------------------------------------------------------------

    async def create_batch(self, batch: Batch) -> None:
        async with self._guard(write=True), self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                self._k("batch", batch.id),
                mapping={"data": batch_to_json(batch), "status": batch.status.value, "owner": batch.owner},
            )
            pipe.zadd(self._k("batches"), {batch.id: batch.created_at})
            pipe.zadd(self._k("batches", batch.owner), {batch.id: batch.created_at})
            pipe.zadd(self._k("batches:due"), {batch.id: 0})
            await pipe.execute()

    async def _read_batches(self, ids: Sequence[str]) -> builtins.list[Batch]:
        async with self._guard(), self._redis.pipeline(transaction=False) as pipe:
            for batch_id in ids:
                pipe.hmget(self._k("batch", batch_id), ["data", "cancel_requested_at"])
            rows = await pipe.execute()
        return [
            batch_from_json(data, None if cancel is None else float(cancel))
            for data, cancel in rows
            if data is not None
        ]

    async def get_batch(self, batch_id: str) -> Batch:
        found = await self._read_batches([batch_id])
        if not found:
            raise BatchNotFoundError()
        return found[0]

    async def list_batches(self, owner: str | None, *, limit: int = 20) -> builtins.list[Batch]:
        index = self._k("batches") if owner is None else self._k("batches", owner)
        async with self._guard():
            ids = cast(builtins.list[str], await self._redis.zrevrange(index, 0, limit - 1))
        return await self._read_batches(ids)

    async def request_cancel(self, batch_id: str) -> Batch:
        active = [status.value for status in ACTIVE_STATUSES]
        keys = [self._k("batch", batch_id), self._k("batches:due")]
        if not await self._script("request_cancel", keys, [batch_id, self._wall(), *active]):
            raise BatchNotFoundError()
        return await self.get_batch(batch_id)

    async def claim_due(self, worker: str, lease_s: float, limit: int) -> builtins.list[Batch]:
        fake_now = "" if self._clock is None else repr(float(self._clock()))
        args = [self.prefix, worker, repr(self._wall()), repr(float(lease_s)), limit, fake_now]
        ids = await self._script("claim", [], args)
        return await self._read_batches(ids)

    async def save(self, batch: Batch, worker: str) -> bool:
        keys = [self._k("batch", batch.id)]
        return bool(await self._script("save", keys, [worker, batch.status.value, batch_to_json(batch)]))

    async def release(self, batch_id: str, worker: str, next_check_at: float, *, done: bool) -> None:
        keys = [self._k("batch", batch_id), self._k("batches:due")]
        await self._script("release", keys, [worker, batch_id, next_check_at, "1" if done else "0"])

    # -- lines ---------------------------------------------------------------------------------------

    async def clear_lines(self, batch_id: str) -> None:
        async with self._guard(write=True):
            await self._redis.delete(*(self._line_key(batch_id, name) for name in _LINE_KEYS))

    async def add_lines(self, batch_id: str, lines: Sequence[tuple[int, str]]) -> builtins.list[int]:
        if not lines:
            return []
        keys = [self._line_key(batch_id, name) for name in ("all", "cid", "custom")]
        args = [item for number, custom_id in lines for item in (number, custom_id)]
        return [int(number) for number in await self._script("add_lines", keys, args)]

    async def set_jobs(self, batch_id: str, jobs: Sequence[tuple[int, str]]) -> None:
        if jobs:
            keys = [self._line_key(batch_id, name) for name in ("jobs", "outcome", "open")]
            await self._script("set_jobs", keys, [item for pair in jobs for item in pair])

    async def open_lines(self, batch_id: str, after: int, limit: int) -> builtins.list[tuple[int, str]]:
        async with self._guard():
            numbers = cast(
                builtins.list[str],
                await self._redis.zrangebyscore(
                    self._line_key(batch_id, "open"), f"({after}", "+inf", start=0, num=limit
                ),
            )
            if not numbers:
                return []
            job_ids = await self._redis.hmget(self._line_key(batch_id, "jobs"), numbers)
        return [(int(number), str(job_id)) for number, job_id in zip(numbers, job_ids, strict=True) if job_id]

    async def set_outcomes(self, batch_id: str, outcomes: Sequence[tuple[int, LineOutcome]]) -> None:
        if outcomes:
            keys = [self._line_key(batch_id, name) for name in ("outcome", "open", "counts")]
            await self._script("set_outcomes", keys, [item for n, o in outcomes for item in (n, o.value)])

    async def outcome_counts(self, batch_id: str) -> dict[LineOutcome, int]:
        async with self._guard():
            counts = await self._redis.hgetall(self._line_key(batch_id, "counts"))
        return {LineOutcome(str(name)): int(n) for name, n in counts.items()}

    async def lines(self, batch_id: str, after: int, limit: int) -> builtins.list[Line]:
        async with self._guard():
            numbers = cast(
                builtins.list[str],
                await self._redis.zrangebyscore(
                    self._line_key(batch_id, "all"), f"({after}", "+inf", start=0, num=limit
                ),
            )
            if not numbers:
                return []
            async with self._redis.pipeline(transaction=False) as pipe:
                for name in ("custom", "jobs", "outcome"):
                    pipe.hmget(self._line_key(batch_id, name), numbers)
                customs, jobs, outcomes = await pipe.execute()
        return [
            Line(int(number), custom_id, job_id, LineOutcome(outcome) if outcome else None)
            for number, custom_id, job_id, outcome in zip(numbers, customs, jobs, outcomes, strict=True)
        ]
