"""The Redis job store: one Redis server (or managed instance) shared by replicas on many machines.

Key layout, every key under ``{prefix}:`` (``textgen`` by default, so several deployments can share a
server):

- ``job:{id}``            hash: the ``Job`` fields (absent = None; JSON for request/result; floats as
                          strings) plus ``seq`` (creation order), ``idem_key``, ``webhook_owner`` and
                          ``webhook_lease_until``
- ``seq``                 INCR counter giving every job its creation order
- ``jobs``                zset id -> seq: every job (``list`` without a state, newest first)
- ``tenant:{owner}``      zset id -> seq: one owner's jobs (``list`` for that owner); jobs stored before
                          owners existed have no ``tenant`` field and belong to the anonymous owner
- ``state:{state}``       zset id -> seq per state (``list`` with a state, ``count``)
- ``queued``              zset id -> seq: the FIFO queue (ZRANK = queue position); a re-queued job keeps
                          its seq, so it goes back to its old place, as in SQLite (ORDER BY created_at)
- ``leases``              zset id -> lease_until: exactly the running jobs
- ``finished``            zset id -> finished_at: every ended job (``purge_finished``)
- ``completions``         zset id -> finished_at: succeeded/failed jobs (``recent_completions``)
- ``webhooks:due``        zset id -> finished_at: pending webhooks nobody holds
- ``webhooks:claimed``    zset id -> claim expiry: pending webhooks held by a delivering process
- ``idem:{owner} {key}``  hash: fingerprint, job_id, created_at of an Idempotency-Key (expires in Redis
                          an hour after its TTL, as hygiene; lookups apply the TTL cutoff themselves)

Every state change is one Lua script, so it is atomic across processes. Scripts read the server's
clock (``TIME``) for started_at / finished_at / leases / idempotency ages, so machines whose clocks
disagree still agree on when a lease expired; ``created_at`` comes from the creating client's clock
(``new_job``), as in SQLite. Scripts derive key names from the prefix, so on Redis Cluster the
prefix needs a hash tag (``{textgen}``) to keep every key in one slot.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import json
import logging
import re
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, cast

from redis.commands.core import AsyncScript

from textgen.access import ANONYMOUS_OWNER
from textgen.errors import (
    IdempotencyConflictError,
    JobNotCancellableError,
    JobNotFoundError,
)
from textgen.jobs.store import (
    DIED_IN_PHASE_PREFIX,
    DIED_IN_PHASE_SUFFIX,
    STILL_RUNNING,
    Job,
    JobState,
    WebhookState,
    abandoned_error,
    check_finish_state,
    check_ttl,
    check_visible,
    claim_cancel_safe,
    new_job,
    request_fingerprint,
    scoped_idempotency_key,
    validate_idempotency_key,
)
from textgen.storage.lua import lua_scripts
from textgen.storage.redis import check_durability, ping_redis, redis_client, redis_outage_guard
from textgen.storage.url import redact_url

logger = logging.getLogger(__name__)

_IDEMPOTENCY_GRACE_S = 3600.0  # how long past its TTL Redis keeps an idempotency record before expiring it
_BATCH = 500  # ids per script call when renewing / purging, and keys per SCAN step

# Lua scripts (``lua/*.lua`` beside this module). Every script gets the key prefix as ARGV[1] and starts
# with ``lua/prelude.lua`` (key names, the server clock, the moves between states).
_SCRIPTS: dict[str, str] = lua_scripts(
    Path(__file__).parent / "lua",
    (
        "create",
        "create_idempotent",
        "create_finished",
        "delete",
        "claim",
        "release",
        "renew",
        "finish",
        "cancel",
        "requeue_owned",
        "running_owners",
        "expire_leases_of",
        "requeue_expired",
        "set_phase",
        "claim_webhook",
        "record_webhook",
        "list",
        "list_tenant",
        "recent_completions",
        "purge_finished",
        "purge_idempotency",
    ),
    prelude="prelude",
)


# --------------------------------------------------------------------------------------------------
# Hash <-> Job
# --------------------------------------------------------------------------------------------------


def _job_fields(job: Job) -> list[str]:
    """Field/value pairs of a new job's hash (None values left out)."""
    values: dict[str, str | None] = {
        "id": job.id,
        "request": json.dumps(job.request, separators=(",", ":")),
        "state": job.state.value,
        "request_id": job.request_id,
        "created_at": repr(job.created_at),
        "attempts": str(job.attempts),
        "callback_url": job.callback_url,
        "webhook_attempts": str(job.webhook_attempts),
        "tenant": job.tenant,
        "reservation": job.reservation,
    }
    return [item for name, value in values.items() if value is not None for item in (name, value)]


def _float(value: str | None) -> float | None:
    return None if value is None else float(value)


def _pairs(flat: Sequence[str]) -> dict[str, str]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _job(fields: dict[str, str]) -> Job:
    result = fields.get("result")
    webhook_state = fields.get("webhook_state")
    return Job(
        id=fields["id"],
        request=json.loads(fields["request"]),
        state=JobState(fields["state"]),
        request_id=fields.get("request_id"),
        result=None if result is None else json.loads(result),
        error=fields.get("error"),
        created_at=float(fields["created_at"]),
        started_at=_float(fields.get("started_at")),
        finished_at=_float(fields.get("finished_at")),
        attempts=int(fields.get("attempts", "0")),
        owner=fields.get("owner"),
        lease_until=_float(fields.get("lease_until")),
        callback_url=fields.get("callback_url"),
        webhook_state=None if webhook_state is None else WebhookState(webhook_state),
        webhook_attempts=int(fields.get("webhook_attempts", "0")),
        webhook_error=fields.get("webhook_error"),
        webhook_at=_float(fields.get("webhook_at")),
        tenant=fields.get("tenant", ANONYMOUS_OWNER),
        reservation=fields.get("reservation"),
        phase=fields.get("phase"),
    )


def _optional(value: str | None) -> list[str]:
    """A flag and a value, for a script argument that may be None (which differs from '')."""
    return ["0", ""] if value is None else ["1", value]


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


# --------------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------------


class RedisJobStore:
    """``JobStore`` on Redis: every state change one Lua script, leases on the server's clock."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "textgen",
        allow_volatile: bool = False,
        clock: Callable[[], float] | None = None,
    ) -> None:
        """``clock``: None (the default) uses the Redis server's clock, so replicas agree on leases; a
        callable (tests) is read before every script call and used instead."""
        if not prefix:
            raise ValueError("prefix must not be empty")
        self._clock = clock
        self._url = url
        self.prefix = prefix
        self.allow_volatile = allow_volatile
        self._redis = redis_client(url)
        self._scripts: dict[str, AsyncScript] = {
            name: self._redis.register_script(body) for name, body in _SCRIPTS.items()
        }
        self._opened = False

    @classmethod
    def from_url(cls, url: str, *, prefix: str = "textgen", allow_volatile: bool = False) -> RedisJobStore:
        """The constructor under its older name (tests and tools use both)."""
        return cls(url, prefix=prefix, allow_volatile=allow_volatile)

    @property
    def url(self) -> str:
        """The URL with any password hidden."""
        return redact_url(self._url)

    def __repr__(self) -> str:
        return f"RedisJobStore({self.url!r}, prefix={self.prefix!r})"

    async def open(self) -> None:
        """Connect, and refuse a server that would lose accepted jobs in a restart (no AOF) unless
        ``allow_volatile`` (TEXTGEN_REDIS_ALLOW_VOLATILE)."""
        await ping_redis(self._redis, self._url)
        durability = await check_durability(self._redis, self._url, allow_volatile=self.allow_volatile)
        self._opened = True
        logger.info("Job store open at %s (prefix %r; %s)", self.url, self.prefix, durability)

    async def close(self) -> None:
        self._opened = False
        await self._redis.aclose()

    def _require_open(self) -> None:
        if not self._opened:
            raise RuntimeError(f"The Redis job store at {self.url} is not open; call open() first.")

    @contextlib.asynccontextmanager
    async def _guard(self, *, write: bool = False) -> AsyncIterator[None]:
        """Plain commands here read; scripts (``_call``) write."""
        self._require_open()
        async with redis_outage_guard(self._url, "job store", write=write, client=self._redis):
            yield

    async def _call(self, script: str, *args: str | int | float) -> Any:
        async with self._guard(write=True):
            if self._clock is not None:
                await self._redis.set(self._key("clock"), repr(float(self._clock())))
            return await self._scripts[script](keys=[], args=[self.prefix, *args])

    def _now(self) -> float | None:
        return None if self._clock is None else self._clock()

    def _key(self, name: str) -> str:
        return f"{self.prefix}:{name}"

    # -- jobs --------------------------------------------------------------------------------------

    async def create(
        self,
        request: dict[str, Any],
        *,
        request_id: str | None,
        callback_url: str | None = None,
        tenant: str = ANONYMOUS_OWNER,
        reservation: str | None = None,
    ) -> Job:
        job = new_job(request, request_id, callback_url, tenant, reservation, now=self._now())
        await self._call("create", job.id, *_job_fields(job))
        return job

    async def create_idempotent(
        self,
        request: dict[str, Any],
        *,
        request_id: str | None,
        key: str,
        ttl_s: float,
        callback_url: str | None = None,
        tenant: str = ANONYMOUS_OWNER,
        reservation: str | None = None,
    ) -> tuple[Job, bool]:
        """Same contract as ``SQLiteJobStore.create_idempotent``, in one script (atomic across processes)."""
        validate_idempotency_key(key)
        check_ttl(ttl_s)
        job = new_job(request, request_id, callback_url, tenant, reservation, now=self._now())
        expire_ms = int((ttl_s + _IDEMPOTENCY_GRACE_S) * 1000)
        fingerprint = request_fingerprint(job.request)
        scoped = scoped_idempotency_key(tenant, key)
        reply = await self._call(
            "create_idempotent", job.id, scoped, fingerprint, repr(float(ttl_s)), expire_ms, *_job_fields(job)
        )
        if reply[0] == "conflict":
            raise IdempotencyConflictError()
        if reply[0] == "existing":
            existing = _job(_pairs(reply[1]))
            logger.debug("Idempotency-Key replay: returning job %s", existing.id)
            return existing, False
        return job, True

    async def get(self, job_id: str, *, tenant: str | None = None) -> Job:
        async with self._guard():
            # decode_responses=True: keys and values are str
            fields = cast(dict[str, str], await self._redis.hgetall(self._key(f"job:{job_id}")))
        if not fields:
            raise JobNotFoundError()
        return check_visible(_job(fields), tenant)

    async def list(
        self, *, state: JobState | None = None, limit: int = 50, tenant: str | None = None
    ) -> builtins.list[Job]:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        if limit == 0:
            return []
        if tenant is not None:
            wanted = "" if state is None else JobState(state).value
            rows = await self._call("list_tenant", tenant, wanted, limit)
            return [_job(_pairs(row)) for row in rows if row]
        index = "jobs" if state is None else f"state:{JobState(state).value}"
        rows = await self._call("list", index, limit)
        return [_job(_pairs(row)) for row in rows if row]

    async def claim_next(self, owner: str, lease_s: float) -> Job | None:
        return await claim_cancel_safe(
            self._claim(owner, lease_s), lambda job: self._call("release", job.id, owner), owner
        )

    async def _claim(self, owner: str, lease_s: float) -> Job | None:
        reply = await self._call("claim", owner, repr(float(lease_s)))
        return _job(_pairs(reply)) if reply else None

    async def renew(self, owner: str, job_ids: Sequence[str], lease_s: float) -> set[str]:
        ids = builtins.list(dict.fromkeys(job_ids))
        held: set[str] = set()
        for i in range(0, len(ids), _BATCH):
            held.update(await self._call("renew", owner, repr(float(lease_s)), *ids[i : i + _BATCH]))
        return held

    async def finish(
        self,
        job_id: str,
        owner: str,
        state: JobState,
        *,
        result: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> bool:
        state = check_finish_state(state)
        result_json = None if result is None else json.dumps(result, separators=(",", ":"))
        done = bool(await self._call("finish", job_id, owner, state.value, *_optional(result_json), *_optional(error)))
        if not done:
            logger.info("Job %s not finished by %s: no longer running under that owner", job_id, owner)
        return done

    async def create_finished(
        self,
        request: dict[str, Any],
        *,
        request_id: str | None,
        result: dict[str, Any],
        tenant: str = ANONYMOUS_OWNER,
        job_id: str | None = None,
    ) -> Job:
        job = new_job(request, request_id, None, tenant, None, now=self._now())
        job = dataclasses.replace(
            job, id=job_id or job.id, state=JobState.SUCCEEDED, result=json.loads(json.dumps(result))
        )
        result_json = json.dumps(job.result, separators=(",", ":"))
        finished_at = await self._call("create_finished", job.id, *_job_fields(job), "result", result_json)
        return dataclasses.replace(job, finished_at=float(finished_at))

    async def delete(self, job_id: str, *, tenant: str | None = None) -> Job:
        reply = await self._call("delete", job_id, tenant or "")
        if reply[0] == "missing":
            raise JobNotFoundError()
        if reply[0] == "live":
            raise JobNotCancellableError(STILL_RUNNING)
        return _job(_pairs(reply[1]))

    async def set_phase(self, job_id: str, owner: str, phase: str | None) -> bool:
        return bool(await self._call("set_phase", job_id, owner, *_optional(phase)))

    async def cancel(self, job_id: str, *, tenant: str | None = None) -> Job:
        reply = await self._call("cancel", job_id, tenant or "")
        if reply[0] == "missing":
            raise JobNotFoundError()
        if reply[0] == "ended":
            raise JobNotCancellableError()
        return _job(_pairs(reply[1]))

    async def release(self, job_id: str, owner: str) -> bool:
        """Hand a claimed job that never started back to the queue (its attempt does not count)."""
        return bool(await self._call("release", job_id, owner))

    async def requeue_owned(self, owner: str) -> int:
        n = int(await self._call("requeue_owned", owner))
        if n:
            logger.info("Re-queued %d running job(s) of %s", n, owner)
        return n

    async def requeue_orphaned(self, is_owner_alive: Callable[[str], bool]) -> int:
        owners: builtins.list[str] = await self._call("running_owners")
        dead = [owner for owner in owners if not is_owner_alive(owner)]
        if not dead:
            return 0
        # The script re-checks state and owner, so a job that moved on meanwhile is left alone.
        return int(await self._call("expire_leases_of", *dead))

    async def requeue_expired(self, max_attempts: int) -> tuple[int, int]:
        requeued, failed = await self._call(
            "requeue_expired", max_attempts, abandoned_error(max_attempts), DIED_IN_PHASE_PREFIX, DIED_IN_PHASE_SUFFIX
        )
        return int(requeued), int(failed)

    async def position(self, job_id: str) -> int | None:
        async with self._guard():
            rank = await self._redis.zrank(self._key("queued"), job_id)
        return cast(int | None, rank)  # without withscore: the rank or None

    async def recent_completions(self, within_s: float, limit: int) -> builtins.list[float]:
        if limit <= 0:
            return []
        flat = await self._call("recent_completions", repr(float(within_s)), limit)
        return [float(score) for score in flat[1::2]]

    async def claim_webhook(self, owner: str, lease_s: float) -> Job | None:
        reply = await self._call("claim_webhook", owner, repr(float(lease_s)))
        return _job(_pairs(reply)) if reply else None

    async def record_webhook(
        self, job_id: str, owner: str, state: WebhookState, *, attempts: int, error: str | None
    ) -> bool:
        state = WebhookState(state)
        return bool(await self._call("record_webhook", job_id, owner, state.value, attempts, *_optional(error)))

    async def states(self, job_ids: Sequence[str]) -> dict[str, JobState]:
        ids = builtins.list(dict.fromkeys(job_ids))
        if not ids:
            return {}
        async with self._guard(), self._redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hget(self._key(f"job:{job_id}"), "state")
            found = await pipe.execute()
        return {job_id: JobState(state) for job_id, state in zip(ids, found, strict=True) if state is not None}

    async def purge_finished(self, older_than_s: float) -> int:
        """Delete jobs that ended longer ago than ``older_than_s`` and their idempotency records.

        In batches, so one script never holds the server for long."""
        total = 0
        while True:
            n = int(await self._call("purge_finished", repr(float(older_than_s)), _BATCH))
            total += n
            if n < _BATCH:
                return total

    async def purge_idempotency(self, older_than_s: float) -> int:
        """Delete idempotency records older than ``older_than_s`` (pass ``idempotency_ttl_s``); returns how many."""
        total = 0
        pattern = _glob_escape(self._key("idem:")) + "*"
        batch: builtins.list[str] = []
        async with self._guard():
            async for key in self._redis.scan_iter(match=pattern, count=_BATCH):
                batch.append(key)
                if len(batch) >= _BATCH:
                    total += int(await self._call("purge_idempotency", repr(float(older_than_s)), *batch))
                    batch = []
        if batch:
            total += int(await self._call("purge_idempotency", repr(float(older_than_s)), *batch))
        return total

    async def count(self, state: JobState) -> int:
        async with self._guard():
            count: int = await self._redis.zcard(self._key(f"state:{JobState(state).value}"))
        return count
