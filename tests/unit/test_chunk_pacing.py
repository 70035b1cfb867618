"""A long prompt's chunked prefill beside decoding streams keeps the streams at >= 0.7 of their rate, whatever
a prompt token costs where the chunk is (attention over a long prefix, a weight-format switch): the pacer on
its own with modelled costs, then the scheduler on the tiny GPT-2 with a fake clock that charges each step
what such a model would cost (the former rule, a chunk of at least 16 tokens in every step, kept 0.4)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.support.waiting import wait_until
from textgen.engine.chunk_pacing import ChunkPacer
from textgen.engine.core import CoreOptions
from textgen.engine.scheduler import CHUNK_COST, CHUNK_STEP_SHARE, MIN_CHUNK_TOKENS, BatchedEngine
from textgen.engine.types import (
    EngineLimits,
    GenerationRequest,
    SamplingParams,
    SpeculationMode,
    SpeculationSettings,
)

DECODE_S = 0.010  # a decode-only step of the streams
STEP_FIXED_S = 0.002  # what carrying any prompt adds (a format switch, the prefill pass's set-up)


def prompt_token_s(position: int) -> float:
    """A prompt token's cost grows with the positions it attends (at 6,000 positions, more than a decode step)."""
    return 0.0004 + 0.000002 * position


def chunk_s(start: int, tokens: int) -> float:
    return STEP_FIXED_S + sum(prompt_token_s(p) for p in range(start, start + tokens))


def pacer() -> ChunkPacer:
    return ChunkPacer(CHUNK_STEP_SHARE, CHUNK_COST, MIN_CHUNK_TOKENS, max_tokens=256)


def simulate(prompt: int, restart_tokens: int = 0) -> tuple[float, int]:
    """Steps of streams decoding beside a ``prompt``-token prefill (and ``restart_tokens`` of short prompts
    in every step): the streams' share of the time while it ran, and the steps it took."""
    chunks, done, steps, busy = pacer(), 0, 0, 0.0
    token_s = 0.0
    while done < prompt:
        steps += 1
        size = min(prompt - done, chunks.chunk_tokens(DECODE_S, token_s)) if chunks.chunk_due else 0
        extra = chunk_s(done, size) if size else 0.0
        extra += restart_tokens * prompt_token_s(0) + (STEP_FIXED_S if restart_tokens and not size else 0.0)
        chunks.observe(DECODE_S, DECODE_S + extra, size + restart_tokens, size)
        if size:
            token_s = (extra) / (size + restart_tokens)
        done += size
        busy += DECODE_S + extra
    return steps * DECODE_S / busy, steps


def steps_at_the_share(prompt: int) -> float:
    """The steps a prefill takes when the chunks use exactly the share of every step."""
    return sum(prompt_token_s(p) for p in range(prompt)) / (CHUNK_STEP_SHARE * DECODE_S)


def test_streams_keep_their_share_as_the_prompt_gets_long() -> None:
    share, steps = simulate(6000)
    assert share >= 0.7, share
    # and the prompt moves: every step's credit is spent on it
    assert steps < 1.3 * steps_at_the_share(6000)


def test_the_former_rule_kept_streams_below_the_target() -> None:
    """The rule this replaces: a chunk in every step, sized to 0.4 of a step but never below 16 tokens."""
    busy, done, steps = 0.0, 0, 0
    while done < 6000:
        size = max(16, int(0.4 * DECODE_S / prompt_token_s(done)))
        busy += DECODE_S + chunk_s(done, size)
        done, steps = done + size, steps + 1
    assert steps * DECODE_S / busy < 0.5


def test_the_streams_own_short_prompts_do_not_starve_the_long_one() -> None:
    # restarts cost 0.6 of a step in every step: twice the share the chunks may use
    _, steps = simulate(2000, restart_tokens=10)
    assert steps < 1.3 * steps_at_the_share(2000)


def test_a_chunk_waits_for_a_decode_step_to_be_measured() -> None:
    chunks = pacer()
    chunks.observe(0.0, 0.5, 256, 256)  # the first chunk went before any decode-only step
    assert not chunks.chunk_due
    chunks.observe(DECODE_S, DECODE_S, 0, 0)
    assert chunks.chunk_due


def test_credit_does_not_pile_up_while_no_prompt_waits() -> None:
    chunks = pacer()
    for _ in range(1000):
        chunks.observe(DECODE_S, DECODE_S, 0, 0)
    chunks.observe(DECODE_S, DECODE_S + 5 * DECODE_S, 64, 64)  # one costly chunk: the next ones wait
    assert not chunks.chunk_due


# ----- the scheduler, with a fake clock ---------------------------------------------------------------


class StepClock:
    """Advances only inside core.step, by what the modelled core would take for the step's contents."""

    def __init__(self) -> None:
        self.now = 0.0
        self.steps: list[tuple[int, list[int], float]] = []  # (decode rows, prompt piece sizes, seconds)
        self.positions: dict[int, int] = {}  # prefill slot -> positions prefilled so far

    def read(self) -> float:
        return self.now

    def charge(self, decode_slots: Any, prefill_slots: Any, prompts: Any) -> None:
        cost = DECODE_S if decode_slots else 0.0
        if prompts:
            cost += STEP_FIXED_S
        for slot, prompt in zip(prefill_slots, prompts, strict=True):
            start = self.positions.get(slot, 0)
            cost += sum(prompt_token_s(p) for p in range(start, start + len(prompt)))
            self.positions[slot] = start + len(prompt)
        self.steps.append((len(decode_slots), [len(p) for p in prompts], cost))
        self.now += cost


@pytest.fixture
async def paced_engine(tiny_loaded: Any) -> AsyncIterator[tuple[BatchedEngine, StepClock]]:
    engine = BatchedEngine(
        tiny_loaded,
        # speculation off: drafted steps bypass core.step (the clock charges core.step)
        EngineLimits(max_running=8, max_prompt_tokens=600, embedding_slots=0, prefix_cache=False,
                     speculation=SpeculationSettings(SpeculationMode.OFF)),
        core_options=CoreOptions(weights="float", slots=10, positions=1024),
        warmup=False,
    )
    await engine.start()
    clock = StepClock()
    engine._clock = clock.read
    core, original_step = engine.core, engine.core.step

    def charged_step(decode_slots: Any, tokens: Any, prefill_slots: Any, prompts: Any) -> Any:
        clock.charge(decode_slots, prefill_slots, prompts)
        return original_step(decode_slots, tokens, prefill_slots, prompts)

    core.step = charged_step  # type: ignore[method-assign]
    yield engine, clock
    await engine.stop(0)


async def test_streams_keep_seven_tenths_of_their_rate_beside_a_long_prefill(
    paced_engine: tuple[BatchedEngine, StepClock],
) -> None:
    engine, clock = paced_engine
    long_prompt = tuple(10 + (7 * i) % 380 for i in range(500))  # at its end a token costs 0.14 of a decode step
    greedy = SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True)
    alone = await engine.submit(GenerationRequest("", greedy, prompt_ids=long_prompt)).result()
    stream_params = SamplingParams(max_new_tokens=900, ignore_eos=True, temperature=0.0)
    streams = [engine.submit(GenerationRequest("", stream_params, prompt_ids=(5, 6, 7, i + 10))) for i in range(4)]
    await wait_until(lambda: sum(1 for rows, pieces, _ in clock.steps if rows and not pieces) >= 3,
                     what="the streams decoding")
    first = len(clock.steps)
    beside = await engine.submit(GenerationRequest("", greedy, prompt_ids=long_prompt)).result()
    during = [step for step in clock.steps[first:] if step[0]]
    last = max(i for i, (_, pieces, _) in enumerate(during) if pieces)
    during = during[: last + 1]
    for handle in streams:
        handle.cancel()
    await asyncio.gather(*(h.result() for h in streams), return_exceptions=True)

    assert beside.text == alone.text
    assert sum(sum(pieces) for _, pieces, _ in during) == len(long_prompt)
    share = len(during) * DECODE_S / sum(seconds for _, _, seconds in during)
    assert share >= 0.7, share
    # It was chunked (not one step), and some steps decoded without a chunk (the interleaving).
    assert sum(1 for _, pieces, _ in during if pieces) >= 3
    assert any(not pieces for _, pieces, _ in during)


async def test_with_nothing_decoding_a_long_prompt_is_chunked_when_others_wait_behind_it(
    paced_engine: tuple[BatchedEngine, StepClock],
) -> None:
    """Streams between two requests (all restarting at once) leave nothing decoding for a step: a long
    prompt then must not go whole ahead of them (it used to: a multi-second stall for every stream)."""
    engine, clock = paced_engine
    greedy = SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True)
    long_prompt = tuple(10 + (7 * i) % 380 for i in range(500))
    alone = await engine.submit(GenerationRequest("", greedy, prompt_ids=long_prompt)).result()
    assert [pieces for _, pieces, _ in clock.steps if pieces][-1] == [500]  # the only work: whole
    # Submitted while the engine is held inside the step of a one-token request, so all four are waiting
    # when it next looks (and nothing decodes: that request ends in the step).
    core, counted_step = engine.core, engine.core.step
    held, release = threading.Event(), threading.Event()

    def holding_step(decode_slots: Any, tokens: Any, prefill_slots: Any, prompts: Any) -> Any:
        if [len(p) for p in prompts] == [7] and not release.is_set():
            held.set()
            release.wait(timeout=30)
        return counted_step(decode_slots, tokens, prefill_slots, prompts)

    core.step = holding_step  # type: ignore[method-assign]
    one = SamplingParams(temperature=0.0, max_new_tokens=1)
    blocker = engine.submit(GenerationRequest("", one, prompt_ids=(1, 2, 3, 4, 5, 6, 7)))
    await wait_until(held.is_set, what="the engine inside the one-token request's step")
    first = len(clock.steps) + 1
    try:
        handles = [engine.submit(GenerationRequest("", greedy, prompt_ids=long_prompt))]
        handles += [engine.submit(GenerationRequest("", greedy, prompt_ids=(5, 6, 7, i + 10))) for i in range(3)]
    finally:
        release.set()
    await blocker.result()
    results = await asyncio.gather(*(h.result() for h in handles))
    assert results[0].text == alone.text
    steps = [pieces for _, pieces, _ in clock.steps[first:] if pieces]
    assert steps[0] == [256, 4, 4, 4], steps  # a chunk, and the short prompts beside it
