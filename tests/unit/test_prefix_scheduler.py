"""The scheduler with the prefix cache and chunked prefill, on the tiny GPT-2: cached_tokens, outputs
identical with the cache on and off (greedy and seeded), tenant isolation, eviction under memory
pressure, long prompts cut into chunks while others decode."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from textgen.engine.core import CoreOptions
from textgen.engine.scheduler import BatchedEngine
from textgen.engine.types import EngineLimits, GenerationRequest, GenerationResult, SamplingParams

BLOCK = 8
rng = random.Random(5)
SYSTEM = [rng.randrange(10, 390) for _ in range(70)]  # a shared "system prompt": 8 full blocks and a tail
TURNS = [[rng.randrange(10, 390) for _ in range(n)] for n in (5, 17, 9)]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.9, top_p=0.95, seed=77, max_new_tokens=12, ignore_eos=True)


@pytest.fixture
async def make_engine(tiny_loaded: Any) -> AsyncIterator[Callable[..., Any]]:
    engines: list[BatchedEngine] = []

    async def build(*, memory: int = 1 << 20, shared: bool = False, **limits: Any) -> BatchedEngine:
        limits.setdefault("max_running", 8)
        engine = BatchedEngine(
            tiny_loaded,
            EngineLimits(prefix_cache=memory > 0, prefix_cache_shared=shared, **limits),
            core_options=CoreOptions(
                weights="float", slots=12, positions=512, prefix_cache_bytes=memory, prefix_block_size=BLOCK
            ),
            warmup=False,
        )
        await engine.start()
        engines.append(engine)
        return engine

    yield build
    for engine in engines:
        await engine.stop(0)


async def run(
    engine: BatchedEngine, ids: list[int], params: SamplingParams = GREEDY, tenant: str | None = "a"
) -> GenerationResult:
    request = GenerationRequest("", params, prompt_ids=tuple(ids), tenant=tenant)
    return await engine.submit(request).result()


async def test_a_repeated_prefix_is_served_from_the_cache(make_engine: Callable[..., Any]) -> None:
    engine = await make_engine()
    first = await run(engine, SYSTEM + TURNS[0])
    assert first.cached_tokens == 0
    second = await run(engine, SYSTEM + TURNS[1])
    assert second.cached_tokens == 64  # 8 full blocks of the system prompt; its 6-token tail is computed
    # The whole first prompt again: all but the block holding its last token.
    again = await run(engine, SYSTEM + TURNS[0])
    assert again.cached_tokens == 72 and again.text == first.text
    stats = engine.prefix_stats()
    assert stats is not None and stats.queries == 3 and stats.hits == 2
    assert stats.hit_tokens == 64 + 72


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
async def test_outputs_are_identical_with_the_cache_on_and_off(
    make_engine: Callable[..., Any], params: SamplingParams
) -> None:
    conversations = [SYSTEM + turn for turn in TURNS] + [SYSTEM[:20] + TURNS[2], SYSTEM + TURNS[1] + TURNS[2]]
    texts = {}
    for memory in (0, 1 << 20):
        engine = await make_engine(memory=memory)
        # One at a time (later ones hit), then all together beside each other (hits inside a batch).
        alone = [await run(engine, ids, params) for ids in conversations]
        together = await asyncio.gather(*(run(engine, ids, params) for ids in conversations))
        texts[memory] = [r.text for r in alone + list(together)]
        cached = [r.cached_tokens for r in alone + list(together)]
        assert (sum(cached) > 0) == (memory > 0)
    assert texts[1 << 20] == texts[0]


async def test_a_tenant_never_reuses_another_tenants_prefix(make_engine: Callable[..., Any]) -> None:
    engine = await make_engine()
    assert (await run(engine, SYSTEM + TURNS[0], tenant="alice")).cached_tokens == 0
    for tenant in ("bob", None, "alice "):
        assert (await run(engine, SYSTEM + TURNS[1], tenant=tenant)).cached_tokens == 0, tenant
    assert (await run(engine, SYSTEM + TURNS[1], tenant="alice")).cached_tokens == 64
    # Each of them cached its own copy by now.
    assert (await run(engine, SYSTEM + TURNS[2], tenant="bob")).cached_tokens == 64


async def test_a_shared_cache_matches_across_tenants(make_engine: Callable[..., Any]) -> None:
    engine = await make_engine(shared=True)
    await run(engine, SYSTEM + TURNS[0], tenant="alice")
    assert (await run(engine, SYSTEM + TURNS[1], tenant="bob")).cached_tokens == 64


async def test_eviction_under_memory_pressure_keeps_outputs_right(
    make_engine: Callable[..., Any], tiny_loaded: Any
) -> None:
    reference = await make_engine(memory=0)
    store_block = 2 * tiny_loaded.model.config.n_layer * tiny_loaded.model.config.n_embd * BLOCK * 4
    engine = await make_engine(memory=10 * store_block)  # room for 10 blocks of 8 tokens
    prompts = [[rng.randrange(10, 390) for _ in range(40)] for _ in range(6)]
    for ids in prompts * 2:
        got, want = await run(engine, ids), await run(reference, ids)
        assert got.text == want.text
    stats = engine.prefix_stats()
    assert stats is not None and stats.evicted_blocks > 0 and stats.cached_blocks <= 10
    # The most recent prompt is still cached.
    assert (await run(engine, prompts[-1])).cached_tokens == 32


async def test_a_long_prompt_is_prefilled_in_chunks_beside_running_streams(
    make_engine: Callable[..., Any],
) -> None:
    engine = await make_engine(memory=0, prefill_step_tokens=16)
    core = engine.core
    sizes: list[list[int]] = []
    original_step = core.step

    def recording_step(decode_slots: Any, tokens: Any, prefill_slots: Any, prompts: Any) -> Any:
        sizes.append([len(p) for p in prompts])
        return original_step(decode_slots, tokens, prefill_slots, prompts)

    long_prompt = [rng.randrange(10, 390) for _ in range(300)]
    alone = await run(engine, long_prompt)
    core.step = recording_step  # type: ignore[method-assign]
    streams = [engine.submit(GenerationRequest("", GREEDY.__class__(max_new_tokens=60, ignore_eos=True,
                                                                   temperature=0.0),
                                               prompt_ids=(5, 6, 7, i + 10))) for i in range(4)]
    await asyncio.sleep(0)
    beside = await run(engine, long_prompt)
    await asyncio.gather(*(s.result() for s in streams))
    assert beside.text == alone.text
    # While the streams decoded, no step carried more than 16 prompt tokens, and the long prompt took many.
    assert max(sum(step) for step in sizes) <= 300
    chunked = [step for step in sizes if step and sum(step) <= 16]
    assert len(chunked) >= 300 // 16
