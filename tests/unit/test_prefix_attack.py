"""Attacks on the prefix cache (tiny GPT-2): a client rotating tenants and prefixes cannot evict another
tenant's hot prefix faster than least-recently-used order promises, and cannot make the cache's memory or
bookkeeping grow: the pool is fixed, and every hash it keeps names one of its blocks."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from typing import Any

import pytest

from textgen.engine.core import CoreOptions
from textgen.engine.scheduler import BatchedEngine
from textgen.engine.types import EngineLimits, GenerationRequest, GenerationResult, SamplingParams

rng = random.Random(11)
SYSTEM = [rng.randrange(10, 390) for _ in range(140)]  # the victim's hot prefix: 4 full 32-token blocks
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)


@pytest.fixture
async def engine(tiny_loaded: Any) -> AsyncIterator[BatchedEngine]:
    built = BatchedEngine(
        tiny_loaded,
        EngineLimits(max_running=2, max_prompt_tokens=400, embedding_slots=0),
        core_options=CoreOptions(weights="float", slots=2, positions=512),  # a pool of 2 x 512 / 32 = 32 blocks
        warmup=False,
    )
    await built.start()
    yield built
    await built.stop(0)


async def run(engine: BatchedEngine, ids: list[int], tenant: str) -> GenerationResult:
    return await engine.submit(GenerationRequest("", GREEDY, prompt_ids=tuple(ids), tenant=tenant)).result()


def attacker_prompt() -> list[int]:
    return [rng.randrange(10, 390) for _ in range(64)]  # 2 full blocks, never seen before


async def test_rotating_tenants_cannot_evict_a_prefix_used_within_the_lru_window(engine: BatchedEngine) -> None:
    pool = engine.core.cache.pool  # type: ignore[attr-defined]
    await run(engine, [*SYSTEM, 1, 2, 3], tenant="victim")
    # Every attacker request takes 3 blocks and leaves 2 cached: between two of the victim's turns the
    # attacker takes 5 x 2 = 10 blocks, fewer than the 32 - 5 free beside the victim's, so LRU keeps them.
    for turn in range(40):
        for attack in range(5):
            await run(engine, attacker_prompt(), tenant=f"attacker-{turn}-{attack}")
        hit = await run(engine, [*SYSTEM, 4, 5, turn + 10], tenant="victim")
        assert hit.cached_tokens == 128, f"the victim's prefix was evicted after {turn * 5 + 5} attacker requests"
    # The attacker did fill the pool many times over: what it evicted was its own (older) blocks.
    assert pool.high_water == pool.total
    stats = engine.prefix_stats()
    assert stats is not None and stats.hits == 40  # only the victim's turns hit: no tenant matched another


async def test_a_prefix_not_used_again_ages_out_in_lru_order(engine: BatchedEngine) -> None:
    """The other side of the promise: a prefix that stops being used is evicted once newer content has taken
    the blocks that were free beside it, and not before."""
    pool = engine.core.cache.pool  # type: ignore[attr-defined]
    await run(engine, [*SYSTEM, 1, 2, 3], tenant="victim")
    free_beside = pool.free - pool.cached_free  # never used or recycled: taken before any cached block
    taken = 0
    while taken + 2 < free_beside:  # each attacker request keeps 2 more blocks cached
        await run(engine, attacker_prompt(), tenant=f"attacker-{taken}")
        taken += 2
    assert (await run(engine, [*SYSTEM, 4, 5, 6], tenant="victim")).cached_tokens == 128
    for index in range(free_beside + 8):
        await run(engine, attacker_prompt(), tenant=f"late-{index}")
    assert (await run(engine, [*SYSTEM, 7, 8, 9], tenant="victim")).cached_tokens < 128


async def test_rotating_tenants_and_prefixes_do_not_grow_the_cache(engine: BatchedEngine) -> None:
    pool = engine.core.cache.pool  # type: ignore[attr-defined]
    for index in range(300):
        await run(engine, attacker_prompt(), tenant=f"tenant-{index}")
    pool.check_consistent()
    assert pool.used == 0 and pool.high_water == pool.total  # the pool never grows past its blocks
    # Each remembered hash names a cached block (an evicted block's hash is forgotten with it), so the
    # bookkeeping is bounded by the pool however many tenants and prefixes came by.
    assert len(pool._block_of) == len(pool._hash_of) <= pool.total
    assert set(pool._hash_of) <= set(range(pool.total))
    # and the index keeps no per-tenant state: its only field that changes is a set of counters
    assert set(vars(engine._prefix.index)) == {"block_size", "shared", "_stats"}  # type: ignore[union-attr]
