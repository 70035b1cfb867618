"""The scheduler with the prefix cache and chunked prefill, on the tiny GPT-2: cached_tokens, outputs
identical with the cache on and off (greedy and seeded), tenant isolation, eviction under memory
pressure, long prompts cut into chunks while others decode."""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from tests.support.engines import engines_stopped_after
from tests.support.waiting import wait_until
from textgen.engine.core import CoreOptions
from textgen.engine.core.decoder import DecodeCore
from textgen.engine.scheduler import BatchedEngine
from textgen.engine.types import (
    EngineLimits,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    SpeculationMode,
    SpeculationSettings,
)

BLOCK = 32  # the KV cache's block size (its default)
rng = random.Random(5)
SYSTEM = [rng.randrange(10, 390) for _ in range(140)]  # a shared "system prompt": 4 full blocks and a tail
TURNS = [[rng.randrange(10, 390) for _ in range(n)] for n in (5, 17, 9)]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.9, top_p=0.95, seed=77, max_new_tokens=12, ignore_eos=True)


@pytest.fixture
async def make_engine(tiny_loaded: Any) -> AsyncIterator[Callable[..., Any]]:
    async with engines_stopped_after() as engines:

        async def build(*, cache: bool = True, shared: bool = False, slots: int = 12, **limits: Any) -> BatchedEngine:
            limits.setdefault("max_running", min(8, slots))
            limits.setdefault("max_prompt_tokens", 400)
            engine = BatchedEngine(
                tiny_loaded,
                EngineLimits(prefix_cache=cache, prefix_cache_shared=shared, embedding_slots=0, **limits),
                core_options=CoreOptions(weights="float", slots=slots, positions=512),
                warmup=False,
            )
            return await engines.start(engine)

        yield build


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
    assert second.cached_tokens == 128  # 4 full blocks of the system prompt; its 12-token tail is computed
    # A prompt of exactly 5 blocks, twice: all but the block holding its last token.
    exact = SYSTEM + TURNS[1][:20]
    await run(engine, exact)
    again = await run(engine, exact)
    assert again.cached_tokens == 128
    stats = engine.prefix_stats()
    assert stats is not None and stats.queries == 4 and stats.hits == 3
    assert stats.hit_tokens == 3 * 128


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
async def test_outputs_are_identical_with_the_cache_on_and_off(
    make_engine: Callable[..., Any], params: SamplingParams
) -> None:
    conversations = [SYSTEM + turn for turn in TURNS] + [SYSTEM[:20] + TURNS[2], SYSTEM + TURNS[1] + TURNS[2]]
    texts = {}
    for cache in (False, True):
        engine = await make_engine(cache=cache)
        # One at a time (later ones hit), then all together beside each other (hits inside a batch).
        alone = [await run(engine, ids, params) for ids in conversations]
        together = await asyncio.gather(*(run(engine, ids, params) for ids in conversations))
        texts[cache] = [r.text for r in alone + list(together)]
        cached = [r.cached_tokens for r in alone + list(together)]
        assert (sum(cached) > 0) == cache
    assert texts[True] == texts[False]


LONG_GREEDY = SamplingParams(temperature=0.0, max_new_tokens=40, ignore_eos=True, logprobs=0)
LONG_SEEDED = SamplingParams(temperature=0.9, top_p=0.95, seed=77, max_new_tokens=40, ignore_eos=True, logprobs=0)


@pytest.mark.parametrize("params", [LONG_GREEDY, LONG_SEEDED], ids=["greedy", "seeded"])
async def test_a_chat_turn_finds_the_previous_answer_cached(
    make_engine: Callable[..., Any], monkeypatch: pytest.MonkeyPatch, params: SamplingParams
) -> None:
    """Where the core's decode steps write the keys and values a prefill would (``decode_kv_is_prefill_kv``,
    tested bit for bit in test_prefix_core; said here of the float32 GPT-2, whose PyTorch path differs from
    its prefill in the last bits of some values only, to exercise the scheduler), a finished sequence names
    its generated blocks too: the next turn, which resends the answer, finds them (a block holding the last,
    never computed, position would change the text); another tenant finds none of them."""
    monkeypatch.setattr(DecodeCore, "decode_kv_is_prefill_kv", property(lambda core: True))
    await assert_the_next_turn_finds_the_answer(make_engine, params, idle_work=False)


async def assert_the_next_turn_finds_the_answer(
    make_engine: Callable[..., Any], params: SamplingParams, *, idle_work: bool
) -> None:
    """Two chat turns with the cache off and on: the second resends the first's answer. With the cache on it
    finds the answer's blocks (``idle_work``: once the engine has prefilled them while idle), its text the same
    as with the cache off; another tenant finds none of them."""
    first_turn = SYSTEM + TURNS[0]  # 145 tokens: 4 full blocks; with its 40 generated tokens, 5 are written
    outcomes = {}
    for cache in (False, True):
        engine = await make_engine(cache=cache)
        assert engine.core.decode_kv_is_prefill_kv is not idle_work
        first = await run(engine, first_turn, params)
        assert first.token_logprobs is not None
        answer = [entry.token_id for entry in first.token_logprobs]
        if idle_work:
            await wait_until(lambda: not engine._answers, what="the answer prefilled")  # noqa: B023
        second = await run(engine, first_turn + answer + TURNS[1], params)
        outcomes[cache] = (first.text, second.text, second.cached_tokens)
        if cache:
            other = await run(engine, first_turn + answer + TURNS[1], params, tenant="b")
            assert other.cached_tokens == 0 and other.text == second.text
    assert outcomes[True][:2] == outcomes[False][:2]
    assert outcomes[False][2] == 0 and outcomes[True][2] == 160  # (145 + 40 - 1) // 32 blocks, not 4


async def test_generated_blocks_are_not_named_where_decode_steps_write_other_bits(
    make_engine: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(DecodeCore, "decode_kv_is_prefill_kv", property(lambda core: False))
    monkeypatch.setattr(BatchedEngine, "_prefill_answer", lambda engine: engine._answers.clear())  # no idle work
    engine = await make_engine()
    first = await run(engine, SYSTEM + TURNS[0], LONG_GREEDY)
    assert first.token_logprobs is not None
    answer = [entry.token_id for entry in first.token_logprobs]
    assert (await run(engine, SYSTEM + TURNS[0] + answer + TURNS[1])).cached_tokens == 128  # the prompt's alone


@pytest.mark.parametrize("params", [LONG_GREEDY, LONG_SEEDED], ids=["greedy", "seeded"])
async def test_an_idle_engine_prefills_and_names_a_finished_answer(
    make_engine: Callable[..., Any], params: SamplingParams
) -> None:
    """Where decode steps write other bits than a prefill (the float32 GPT-2's PyTorch path), a finished
    answer's blocks are prefilled as a prompt's would be once nothing else runs, and named: the next turn
    finds them, its text the same as with the cache off; another tenant finds none of them."""
    await assert_the_next_turn_finds_the_answer(make_engine, params, idle_work=True)


async def test_a_request_arriving_during_an_answers_prefill_waits_for_that_chunk_only(
    make_engine: Callable[..., Any],
) -> None:
    """An answer of 150 tokens leaves 5 blocks to prefill, one 32-token chunk at a time; a request that
    arrives while the first chunk runs is prefilled next, and the answer's other chunks wait until it is done."""
    engine = await make_engine(prefill_chunk_tokens=BLOCK)
    work: list[str] = []
    started, submitted = threading.Event(), threading.Event()
    assert engine._prefix is not None
    prefill_named, step = engine._prefix.prefill_named, engine.core.step

    def answer_chunk(*args: Any) -> bool:
        work.append("answer")
        if not started.is_set():
            started.set()
            submitted.wait(timeout=30)  # the request arrives while this chunk runs
        return prefill_named(*args)

    def recorded_step(decode_slots: Any, tokens: Any, prefill_slots: Any, prompts: Any) -> Any:
        if prompts:
            work.append(f"prefill {[len(p) for p in prompts]}")
        return step(decode_slots, tokens, prefill_slots, prompts)

    engine._prefix.prefill_named = answer_chunk  # type: ignore[method-assign]
    params = SamplingParams(temperature=0.0, max_new_tokens=150, ignore_eos=True)
    await run(engine, SYSTEM + TURNS[0], params)
    engine.core.step = recorded_step  # type: ignore[method-assign]
    await wait_until(started.is_set, what="the first chunk of the answer")
    handle = engine.submit(GenerationRequest("", GREEDY, prompt_ids=tuple(SYSTEM + TURNS[2]), tenant="a"))
    submitted.set()
    assert (await handle.result()).cached_tokens == 128
    await wait_until(lambda: not engine._answers, what="the answer's other chunks")
    # The chunk in flight, then the request (its 21 uncached tokens), then the answer's other 4 chunks and
    # the one block of the request's own answer (149 + 12 tokens).
    assert work == ["answer", "prefill [32]", "prefill [21]"] + ["answer", "prefill [32]"] * 5, work


async def test_a_tenant_never_reuses_another_tenants_prefix(make_engine: Callable[..., Any]) -> None:
    engine = await make_engine()
    assert (await run(engine, SYSTEM + TURNS[0], tenant="alice")).cached_tokens == 0
    for tenant in ("bob", None, "alice "):
        assert (await run(engine, SYSTEM + TURNS[1], tenant=tenant)).cached_tokens == 0, tenant
    assert (await run(engine, SYSTEM + TURNS[1], tenant="alice")).cached_tokens == 128
    # Each of them cached its own copy by now.
    assert (await run(engine, SYSTEM + TURNS[2], tenant="bob")).cached_tokens == 128


async def test_a_shared_cache_matches_across_tenants(make_engine: Callable[..., Any]) -> None:
    engine = await make_engine(shared=True)
    await run(engine, SYSTEM + TURNS[0], tenant="alice")
    assert (await run(engine, SYSTEM + TURNS[1], tenant="bob")).cached_tokens == 128


async def test_eviction_under_memory_pressure_keeps_outputs_right(make_engine: Callable[..., Any]) -> None:
    reference = await make_engine(cache=False)
    engine = await make_engine(slots=2)  # a pool of 2 x 512 / 32 = 32 blocks
    pool = engine.core.cache.pool  # type: ignore[attr-defined]
    prompts = [[rng.randrange(10, 390) for _ in range(100)] for _ in range(12)]  # 3 full blocks each
    for ids in prompts * 2:
        got, want = await run(engine, ids), await run(reference, ids)
        assert got.text == want.text
    pool.check_consistent()
    assert pool.used == 0 and 0 < pool.cached_free <= pool.total
    # The oldest prompts were evicted; the most recent one is still cached.
    assert (await run(engine, prompts[0])).cached_tokens == 0
    assert (await run(engine, prompts[-1])).cached_tokens == 96


async def test_a_long_prompt_is_prefilled_in_chunks_beside_running_streams(
    make_engine: Callable[..., Any],
) -> None:
    # speculation off: drafted steps bypass core.step, and greedy streams that draft well could finish
    # before the long prompt arrives (it would then be prefilled alone, in one step)
    off = SpeculationSettings(SpeculationMode.OFF)
    engine = await make_engine(cache=False, prefill_chunk_tokens=16, speculation=off)
    core = engine.core
    sizes: list[list[int]] = []
    original_step = core.step

    def recording_step(decode_slots: Any, tokens: Any, prefill_slots: Any, prompts: Any) -> Any:
        sizes.append([len(p) for p in prompts])
        return original_step(decode_slots, tokens, prefill_slots, prompts)

    long_prompt = [rng.randrange(10, 390) for _ in range(300)]
    alone = await run(engine, long_prompt)
    core.step = recording_step  # type: ignore[method-assign]
    stream_params = SamplingParams(max_new_tokens=200, ignore_eos=True, temperature=0.0)
    streams = [engine.submit(GenerationRequest("", stream_params, prompt_ids=(5, 6, 7, i + 10))) for i in range(4)]
    await wait_until(lambda: sum(len(step) == 0 for step in sizes) >= 2, what="the streams decoding")
    long_handle = engine.submit(GenerationRequest("", GREEDY, prompt_ids=tuple(long_prompt), tenant="a"))
    await wait_until(lambda: sum(16 in step for step in sizes) >= 2, what="the long prompt's chunks")
    # A short request arriving meanwhile is admitted and prefilled beside the next chunk, not after the last.
    short = await engine.submit(GenerationRequest("", GREEDY, prompt_ids=(9, 8, 7, 6, 5))).result()
    beside = await long_handle.result()
    await asyncio.gather(*(s.result() for s in streams))
    assert beside.text == alone.text and short.completion_tokens == 12
    prefills = [step for step in sizes if step]
    # While the streams decoded, no step carried more than one 16-token chunk: the long prompt took 19 steps.
    assert prefills[0] == [4, 4, 4, 4]
    chunks = [length for step in prefills[1:] for length in step if length != 5]
    assert max(chunks) <= 16 and sum(chunks) == 300 and len(chunks) == 19
    shared = next(i for i, step in enumerate(prefills) if 5 in step)
    assert any(length != 5 for step in prefills[shared + 1 :] for length in step), "the short prompt waited"
