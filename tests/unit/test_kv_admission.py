"""The scheduler over the paged KV cache, on the tiny GPT-2 with a pool too small for everyone: admission
waits for blocks, the newest background sequence is preempted (never an interactive one while a background
one runs) and recomputed later with the same text, no block leaks, and the default prompt limit."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from tests.support.engines import engines_stopped_after
from tests.support.waiting import wait_until
from textgen.engine.core import CoreOptions
from textgen.engine.scheduler import BatchedEngine
from textgen.engine.types import (
    EngineLimits,
    GenerationRequest,
    Priority,
    SamplingParams,
    SpeculationMode,
    SpeculationSettings,
    prompt_token_limit,
)

BLOCK = 16
CAPACITY = 128  # positions per sequence: 8 blocks
GREEDY: dict[str, Any] = {"temperature": 0.0, "ignore_eos": True}
PROMPTS = ["The quick brown fox", "Once upon a time", "Numbers 0 1 2 3", "A robot learned to paint"]


def block_bytes(loaded: Any) -> int:
    config = loaded.model.config
    return int(2 * config.n_layer * config.n_embd * BLOCK * loaded.dtype.itemsize)


@pytest.fixture
async def make_engine(tiny_loaded: Any) -> AsyncIterator[Callable[..., Any]]:
    async with engines_stopped_after() as engines:

        async def build(blocks: int, **limits: Any) -> BatchedEngine:
            limits.setdefault("max_new_tokens_limit", 1000)
            # One token per step: drafts accepted on greedy text can finish a sequence before the pool runs
            # short, and these tests are about when blocks run out (speculation has its own tests).
            limits.setdefault("speculation", SpeculationSettings(SpeculationMode.OFF))
            options = CoreOptions(
                core="textgen", slots=12, positions=CAPACITY, kv_cache_memory=blocks * block_bytes(tiny_loaded),
                kv_block_size=BLOCK,
            )
            engine = BatchedEngine(tiny_loaded, EngineLimits(**limits), core_options=options, warmup=False)
            return await engines.start(engine)

        yield build


def request(prompt: str, tokens: int, priority: Priority = Priority.INTERACTIVE, **params: Any) -> GenerationRequest:
    return GenerationRequest(
        prompt, SamplingParams(max_new_tokens=tokens, **{**GREEDY, **params}), priority=priority
    )


async def test_stats_report_the_pool_and_nothing_leaks(make_engine: Callable[..., Any]) -> None:
    engine = await make_engine(blocks=40)
    assert engine.stats().kv_blocks_total == 40 and engine.stats().kv_blocks_used == 0
    handles = [engine.submit(request(p, 50)) for p in PROMPTS]
    await wait_until(lambda: engine.stats().kv_blocks_used > 0)
    await asyncio.gather(*(h.result() for h in handles))
    await wait_until(lambda: engine.stats().running == 0)
    # a finished answer may be prefilled for the prefix cache meanwhile, in a scratch slot (idle work)
    await wait_until(lambda: engine.stats().kv_blocks_used == 0, what="every block back")


async def test_preempted_sequences_resume_with_the_text_they_would_have_had(
    make_engine: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    """Four sequences of ~105 positions (7 blocks each) in a pool of 12 blocks: at most one whole and a
    piece of another fit, so the newest are preempted and recomputed later."""
    roomy = await make_engine(blocks=80)
    alone = [(await roomy.submit(request(p, 100, Priority.BACKGROUND)).result()).text for p in PROMPTS]
    tight = await make_engine(blocks=12)
    with caplog.at_level(logging.INFO, logger="textgen.engine.scheduler"):
        results = await asyncio.gather(
            *(tight.submit(request(p, 100, Priority.BACKGROUND)).result() for p in PROMPTS)
        )
    assert [r.text for r in results] == alone
    assert all(r.completion_tokens == 100 for r in results)
    # preempted, but not over and over (a resumed sequence keeps its age; admission leaves headroom)
    assert 0 < tight.stats().preemptions <= 2 * len(PROMPTS)
    assert any("preempted a background sequence" in record.message for record in caplog.records)
    await wait_until(lambda: tight.stats().running == 0)
    # a finished answer may be prefilled for the prefix cache meanwhile, in a scratch slot (idle work)
    await wait_until(lambda: tight.stats().kv_blocks_used == 0, what="every block back")


@pytest.mark.parametrize("named", [True, False])
async def test_a_preempted_sequence_resumes_on_its_own_generated_blocks(
    make_engine: Callable[..., Any], monkeypatch: pytest.MonkeyPatch, named: bool
) -> None:
    """Where decode steps write what a prefill would (said here of the float32 GPT-2, whose PyTorch path
    differs in the last bits of some values only), a preempted sequence names its written blocks as it gives
    them back and resumes on them (its prompt is shorter than a block: nothing else of it is cached) instead of
    prefilling its text again; elsewhere its first resumption finds nothing."""
    from textgen.engine.core.decoder import DecodeCore

    monkeypatch.setattr(DecodeCore, "decode_kv_is_prefill_kv", property(lambda core: named))
    roomy = await make_engine(blocks=80)
    alone = [(await roomy.submit(request(p, 100, Priority.BACKGROUND)).result()).text for p in PROMPTS]
    tight = await make_engine(blocks=12)
    resumed: dict[int, int] = {}  # each sequence's first resumption: the cached tokens it found
    look_up = tight._look_up_prefix

    def recorded_look_up(seq: Any) -> None:
        look_up(seq)
        if seq.generated:
            resumed.setdefault(id(seq), seq.prefix_hit.tokens if seq.prefix_hit else 0)

    monkeypatch.setattr(tight, "_look_up_prefix", recorded_look_up)
    results = await asyncio.gather(*(tight.submit(request(p, 100, Priority.BACKGROUND)).result() for p in PROMPTS))
    assert [r.text for r in results] == alone
    assert resumed and (any(resumed.values()) if named else not any(resumed.values()))


async def test_seeded_sampling_survives_preemption(make_engine: Callable[..., Any]) -> None:
    seeded: dict[str, Any] = {"temperature": 0.9, "top_p": 0.95, "seed": 77}
    roomy = await make_engine(blocks=80)
    alone = [(await roomy.submit(request(p, 90, **seeded)).result()).text for p in PROMPTS[:3]]
    tight = await make_engine(blocks=12)
    results = await asyncio.gather(*(tight.submit(request(p, 90, **seeded)).result() for p in PROMPTS[:3]))
    assert tight.stats().preemptions > 0
    assert [r.text for r in results] == alone


async def test_an_interactive_sequence_is_not_preempted_while_a_background_one_runs(
    make_engine: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    engine = await make_engine(blocks=12)
    with caplog.at_level(logging.INFO, logger="textgen.engine.scheduler"):
        background = engine.submit(request(PROMPTS[0], 100, Priority.BACKGROUND))
        await wait_until(lambda: engine.stats().kv_blocks_used >= 2)
        interactive = engine.submit(request(PROMPTS[1], 100))  # newer, and yet the background one yields
        first = await interactive.result()
        await background.result()
    preempted = [r.message for r in caplog.records if "preempted" in r.message]
    assert preempted and all("preempted a background sequence" in message for message in preempted)
    assert first.completion_tokens == 100


async def test_a_prompt_waits_for_blocks_instead_of_failing(make_engine: Callable[..., Any]) -> None:
    """The pool holds one full-context sequence and a block: a second long one is admitted only when the
    first is done (or preempted), and both finish."""
    engine = await make_engine(blocks=9)
    long_prompt = GenerationRequest("(ids)", SamplingParams(max_new_tokens=60, **GREEDY), prompt_ids=(5,) * 60)
    handles = [engine.submit(long_prompt), engine.submit(long_prompt)]
    results = await asyncio.gather(*(h.result() for h in handles))
    assert all(r.completion_tokens == 60 for r in results)
    assert results[0].text == results[1].text


def test_default_prompt_limit_is_the_context_minus_the_generation_budget() -> None:
    assert prompt_token_limit(None, 1024, 8192) == 7168  # SmolLM2: the whole context, less the output budget
    assert prompt_token_limit(None, 1024, 1024) == 1023  # a short context keeps the former 1024 (within it)
    assert prompt_token_limit(None, 1024, 2048) == 1024
    assert prompt_token_limit(1900, 1024, 8192) == 1900  # TEXTGEN_MAX_PROMPT_TOKENS still wins when set
    assert prompt_token_limit(9000, 1024, 8192) == 8191  # within the context, one position to generate
    assert prompt_token_limit(None, 1024, None) == 1024  # no context stated: the old default


async def test_a_waiting_interactive_prompt_preempts_a_running_background_sequence(
    make_engine: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    """A background sequence holds 7 of 12 blocks; an interactive 80-token prompt (5 blocks, and a block of
    headroom) does not fit beside it. It used to wait until the background one finished; now the background
    one yields its blocks, the interactive one finishes first, and the background one resumes with its text."""
    roomy = await make_engine(blocks=80)
    background_alone = (await roomy.submit(request(PROMPTS[0], 120, Priority.BACKGROUND)).result()).text
    interactive_request = GenerationRequest(
        "(ids)", SamplingParams(max_new_tokens=20, **GREEDY), prompt_ids=tuple(range(30, 110))
    )
    interactive_alone = (await roomy.submit(interactive_request).result()).text

    engine = await make_engine(blocks=12)
    core, real_step = engine.core, engine.core.step
    held, release = threading.Event(), threading.Event()

    def step_holding_at_seven_blocks(*args: Any) -> Any:
        if not release.is_set() and engine.stats().kv_blocks_used >= 7:
            held.set()
            release.wait(timeout=30)
        return real_step(*args)

    core.step = step_holding_at_seven_blocks
    with caplog.at_level(logging.INFO, logger="textgen.engine.scheduler"):
        background = engine.submit(request(PROMPTS[0], 120, Priority.BACKGROUND))
        await wait_until(held.is_set, what="the background sequence holding 7 blocks")
        interactive = engine.submit(interactive_request)
        release.set()
        first = await interactive.result()
        assert not background.done, "the interactive prompt waited for the background sequence to finish"
        assert first.text == interactive_alone
        assert (await background.result()).text == background_alone
    preempted = [r.message for r in caplog.records if "preempted" in r.message]
    # (resumed beside the interactive one, it may yield once more as both grow: never the interactive one)
    assert 1 <= len(preempted) <= 2 and all("preempted a background sequence" in m for m in preempted), preempted
    assert engine.stats().preemptions == len(preempted)
    await wait_until(lambda: engine.stats().running == 0)
    # a finished answer may be prefilled for the prefix cache meanwhile, in a scratch slot (idle work)
    await wait_until(lambda: engine.stats().kv_blocks_used == 0, what="every block back")


async def test_an_interactive_request_does_not_wait_behind_background_prompts_waiting_for_blocks(
    make_engine: Callable[..., Any],
) -> None:
    """A background sequence holds 7 of 12 blocks and a second background prompt waits for blocks in the
    backlog: an interactive request arriving now is admitted ahead of it and preempts the running one (it
    used to wait in the queue until the backlog's prompts had started)."""
    engine = await make_engine(blocks=12)
    core, real_step = engine.core, engine.core.step
    holds = [(lambda: engine.stats().kv_blocks_used >= 7, threading.Event(), threading.Event()),
             (lambda: engine.stats().running == 2, threading.Event(), threading.Event())]

    def holding_step(*args: Any) -> Any:
        for condition, held, release in holds:
            if not release.is_set():
                if condition():
                    held.set()
                    release.wait(timeout=30)
                break
        return real_step(*args)

    core.step = holding_step
    greedy = SamplingParams(max_new_tokens=20, **GREEDY)
    running = engine.submit(request(PROMPTS[0], 120, Priority.BACKGROUND))
    await wait_until(holds[0][1].is_set, what="the background sequence holding 7 blocks")
    queued = engine.submit(
        GenerationRequest("(ids)", greedy, prompt_ids=tuple(range(30, 110)), priority=Priority.BACKGROUND)
    )
    holds[0][2].set()
    await wait_until(holds[1][1].is_set, what="the second background prompt admitted, waiting for blocks")
    interactive = engine.submit(GenerationRequest("(ids)", greedy, prompt_ids=tuple(range(110, 30, -1))))
    holds[1][2].set()
    assert (await interactive.result()).completion_tokens == 20
    assert not running.done and not queued.done, "the interactive request waited behind background work"
    results = await asyncio.gather(running.result(), queued.result())
    assert [r.completion_tokens for r in results] == [120, 20]
    assert engine.stats().preemptions >= 1


@pytest.mark.parametrize("new_tokens", [0, 5], ids=["scoring-only", "echo"])
async def test_prompt_logprobs_on_a_full_pool_wait_for_blocks(make_engine: Callable[..., Any], new_tokens: int) -> None:
    """echo with logprobs runs a scratch pass over the prompt; on a pool that another sequence fills it waits
    for blocks like any prompt (it used to fail at admission with a generic engine error), and the entries
    are the ones a roomy pool gives."""
    ids = tuple(range(30, 110))  # 80 tokens: 5 blocks for the scratch pass, 5 more for its own prefill
    scored = GenerationRequest(
        "(ids)", SamplingParams(max_new_tokens=new_tokens, prompt_logprobs=2, **GREEDY), prompt_ids=ids
    )
    roomy = await make_engine(blocks=80)
    want = await roomy.submit(scored).result()
    assert want.prompt_logprobs is not None and len(want.prompt_logprobs) == len(ids)

    engine = await make_engine(blocks=12)
    core, real_step = engine.core, engine.core.step
    held, release = threading.Event(), threading.Event()

    def step_holding_at_eight_blocks(*args: Any) -> Any:
        if not release.is_set() and engine.stats().kv_blocks_used >= 8:
            held.set()
            release.wait(timeout=30)
        return real_step(*args)

    core.step = step_holding_at_eight_blocks
    # interactive, so it is not preempted for the scoring (that has its own test): the scoring has to wait
    running = engine.submit(request(PROMPTS[0], 120))
    await wait_until(held.is_set, what="a sequence holding 8 of the 12 blocks")
    try:
        handle = engine.submit(scored)
    finally:
        release.set()
    got = await asyncio.wait_for(handle.result(), 60)
    assert got.prompt_logprobs == want.prompt_logprobs
    assert got.text == want.text and got.completion_tokens == new_tokens
    assert (await running.result()).completion_tokens == 120
    await wait_until(lambda: engine.stats().running == 0)
    # a finished answer may be prefilled for the prefix cache meanwhile, in a scratch slot (idle work)
    await wait_until(lambda: engine.stats().kv_blocks_used == 0, what="every block back")
