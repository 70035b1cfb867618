"""Speculative decoding: n-gram drafts, the rejection rule, and the engine verifying drafts on the tiny GPT-2
(greedy and seeded text identical on and off, the model's distribution kept, stop strings, max tokens,
grammars and logprobs right when several tokens are accepted in one step)."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import jsonschema
import pytest
import torch

from tests.support.engines import engines_stopped_after
from tests.support.structured import random_schemas
from textgen.engine.constraints import Constraint
from textgen.engine.scheduler import BatchedEngine
from textgen.engine.speculation import Drafter, NgramIndex, SequenceDrafts, accept_or_resample, best_length
from textgen.engine.types import (
    EngineLimits,
    FinishReason,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    SpeculationMode,
    SpeculationSettings,
)

# Upper 0.1% points of the chi-square distribution (a correct sampler fails once in a thousand runs).
CHI2_999 = {5: 20.515, 26: 54.052}


def chi_square(observed: Counter[Any], expected: dict[Any, float], total: int) -> float:
    return sum((observed.get(cell, 0) - total * p) ** 2 / (total * p) for cell, p in expected.items())


# ----- drafts ---------------------------------------------------------------------------------------------


def test_ngram_index_proposes_what_followed_the_latest_earlier_occurrence_of_the_longest_suffix() -> None:
    index = NgramIndex(smallest=2, largest=3)
    index.extend([1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 1, 2, 3])
    # suffix (1, 2, 3) occurred once before, followed by 4 5 ...; the 2-gram (2, 3) more recently by 7 8
    assert index.propose(3) == [4, 5, 9]
    index.extend([6])
    assert index.propose(4) == []  # (3, 6) and (2, 3, 6) were never seen
    index.extend([1, 2])
    assert index.propose(2) == [3, 6]  # (6, 1, 2) is new; (1, 2) last continued by 3, 6
    assert index.propose(0) == []


def test_draft_length_maximises_tokens_per_step_time() -> None:
    lengths = [best_length(rate / 20, 6) for rate in range(20)]
    assert lengths == sorted(lengths)  # longer drafts as more of them are kept
    assert best_length(0.0, 6) == best_length(0.05, 6) == 0  # a draft that is never kept never pays
    assert best_length(0.3, 6) in (1, 2) and best_length(0.97, 6) == 6 and best_length(0.97, 3) == 3


def test_a_sequence_that_keeps_missing_pauses_longer_and_hits_lengthen_its_drafts() -> None:
    state = SequenceDrafts()
    first = state.length(6)
    for _ in range(4):
        state.record(first, first, back_off=True, most=6)
    assert state.length(6) == 6 and state.pause == 0
    pauses = []
    for _ in range(8):
        state.record(3, 0, back_off=True, most=6)
        pauses.append(state.pause)
    assert pauses == [2, 4, 8, 16, 32, 64, 64, 64]
    assert state.length(6) == 1  # a probe
    unpaused = SequenceDrafts()
    unpaused.record(3, 0, back_off=False, most=6)
    assert unpaused.pause == 0


def test_auto_drafts_only_for_small_batches_and_within_every_room() -> None:
    histories = [([1, 2, 3, 4, 5, 6, 1, 2], [])] * 5
    auto = Drafter(SpeculationSettings(SpeculationMode.AUTO, max_draft=6, max_batch=4))
    assert auto.drafts([SequenceDrafts() for _ in range(5)], histories, [9] * 5, 100) == [[]] * 5
    drafts = auto.drafts([SequenceDrafts() for _ in range(4)], histories[:4], [9, 2, 0, 9], 6)
    first = SequenceDrafts().length(6)  # from the prior acceptance rate
    assert first == 3
    assert drafts == [[3, 4, 5], [3, 4], [], [3]]  # rooms 9, 2, 0, 9 and 6 tokens for the whole step
    ngram = Drafter(SpeculationSettings(SpeculationMode.NGRAM, max_draft=6, max_batch=4))
    assert all(ngram.drafts([SequenceDrafts() for _ in range(5)], histories, [9] * 5, 100))
    off = Drafter(SpeculationSettings(SpeculationMode.OFF))
    assert off.drafts([SequenceDrafts()], histories[:1], [9], 100) == [[]]


# ----- the rejection rule ---------------------------------------------------------------------------------


def test_the_rejection_rule_keeps_the_target_distribution_whatever_the_draft() -> None:
    generator = torch.Generator().manual_seed(7)
    target = torch.tensor([0.35, 0.25, 0.2, 0.1, 0.06, 0.04])
    draft = torch.tensor([0.05, 0.1, 0.1, 0.15, 0.3, 0.3])
    total, counts, accepted = 20000, Counter[int](), 0
    for _ in range(total):
        proposed = int(torch.multinomial(draft, 1, generator=generator))
        kept, token = accept_or_resample(target, draft, proposed, generator)
        accepted += kept
        counts[token] += 1
    assert chi_square(counts, dict(enumerate(target.tolist())), total) < CHI2_999[5]
    # P(accept) = sum min(p, q): the rule does accept drafts, not only resample
    assert abs(accepted / total - float(torch.minimum(target, draft).sum())) < 0.02


# ----- the engine --------------------------------------------------------------------------------------------


@pytest.fixture
async def engines(tiny_loaded: Any) -> AsyncIterator[Callable[..., Any]]:
    async with engines_stopped_after() as started:

        async def build(mode: SpeculationMode, **limits: Any) -> BatchedEngine:
            settings = SpeculationSettings(mode, max_draft=limits.pop("max_draft", 6), max_batch=4)
            engine = BatchedEngine(tiny_loaded, EngineLimits(speculation=settings, **limits), warmup=False)
            return await started.start(engine)

        yield build


REPEATING = "one two three four five six seven one two three four five six seven one two three four"


async def generate_all(engine: BatchedEngine, requests: list[GenerationRequest]) -> list[GenerationResult]:
    return list(await asyncio.gather(*(engine.submit(r).result() for r in requests)))


def drafted(engine: BatchedEngine) -> tuple[int, int]:
    return engine._drafter.drafted, engine._drafter.accepted


# Sampling from a random model wanders off any passage; a bias towards three tokens whose every pair is in the
# prompt keeps drafts coming (and accepted or rejected by chance).
A, B, C = 30, 31, 32
PAIRS = (A, A, B, A, C, B, B, C, C, A)
CONFINED = ((A, 100.0), (B, 99.5), (C, 99.0))


@pytest.mark.parametrize("params", [
    {"temperature": 0.0},
    {"temperature": 0.8, "top_p": 0.95, "seed": 11, "logit_bias": CONFINED},
    {"temperature": 1.0, "top_k": 5, "seed": 3, "repetition_penalty": 1.1, "frequency_penalty": 0.3,
     "logit_bias": CONFINED},
], ids=["greedy", "seeded", "seeded-penalties"])
async def test_text_is_identical_with_speculation_on_and_off(
    engines: Callable[..., Any], params: dict[str, Any]
) -> None:
    sampling = SamplingParams(max_new_tokens=40, ignore_eos=True, logprobs=2, **params)
    made = [
        GenerationRequest(p, sampling)
        for p in (REPEATING, "The quick brown fox jumps over the lazy dog. The quick brown fox", "Hi")
    ] + [GenerationRequest("", sampling, prompt_ids=PAIRS)]
    off = await generate_all(await engines(SpeculationMode.OFF), made)
    speculating = await engines(SpeculationMode.NGRAM)
    on = await generate_all(speculating, made)
    for a, b in zip(off, on, strict=True):
        assert a.text == b.text and a.completion_tokens == b.completion_tokens == 40
        assert a.token_logprobs is not None and b.token_logprobs is not None
        assert [e.token_id for e in a.token_logprobs] == [e.token_id for e in b.token_logprobs]
        for x, y in zip(a.token_logprobs, b.token_logprobs, strict=True):
            assert x.logprob == pytest.approx(y.logprob, abs=1e-4)
            assert [t.token_id for t in x.top] == [t.token_id for t in y.top]
    total, accepted = drafted(speculating)
    assert total > 0 and accepted > 0  # the comparison covered accepted drafts


async def test_one_stream_at_a_time_is_identical_too_and_drafts_pay(engines: Callable[..., Any]) -> None:
    """auto, one sequence: greedy text equal to off, with fewer steps than tokens."""
    made = GenerationRequest(REPEATING, SamplingParams(max_new_tokens=60, ignore_eos=True, temperature=0.0))
    off = await generate_all(await engines(SpeculationMode.OFF), [made])
    auto = await engines(SpeculationMode.AUTO)
    steps: list[int] = []
    auto.set_step_observer(lambda rows, _: steps.append(rows))
    on = await generate_all(auto, [made])
    assert on[0].text == off[0].text
    if drafted(auto)[1] > 10:  # the tiny model repeats the passage: most tokens came from accepted drafts
        assert len(steps) < 59


async def test_max_tokens_and_stop_strings_hold_when_several_tokens_are_accepted(
    engines: Callable[..., Any],
) -> None:
    off = await engines(SpeculationMode.OFF)
    on = await engines(SpeculationMode.NGRAM)
    base = SamplingParams(max_new_tokens=30, ignore_eos=True, temperature=0.0)
    reference = (await generate_all(off, [GenerationRequest(REPEATING, base)]))[0].text
    stop = reference[len(reference) // 2 : len(reference) // 2 + 3]
    cases = [
        SamplingParams(max_new_tokens=7, ignore_eos=True, temperature=0.0),
        SamplingParams(max_new_tokens=30, ignore_eos=True, temperature=0.0, stop=(stop,)),
        SamplingParams(max_new_tokens=30, ignore_eos=True, temperature=0.0, min_tokens=12),
    ]
    for params in cases:
        want = (await generate_all(off, [GenerationRequest(REPEATING, params)]))[0]
        got = (await generate_all(on, [GenerationRequest(REPEATING, params)]))[0]
        assert (got.text, got.completion_tokens, got.finish_reason) == (
            want.text, want.completion_tokens, want.finish_reason,
        )
    assert drafted(on)[1] > 0


async def test_streamed_deltas_add_up_to_the_text_when_steps_accept_several_tokens(
    engines: Callable[..., Any],
) -> None:
    engine = await engines(SpeculationMode.NGRAM)
    handle = engine.submit(GenerationRequest(REPEATING, SamplingParams(max_new_tokens=40, ignore_eos=True)))
    pieces = [delta async for delta in handle.stream()]
    result = await handle.result()
    assert "".join(pieces) == result.text and result.completion_tokens == 40


async def test_sampled_tokens_keep_the_models_distribution_when_drafts_are_verified(
    engines: Callable[..., Any], tiny_loaded: Any
) -> None:
    """Chi-square over the 27 possible 3-token continuations: logit_bias confines sampling to tokens a, b, c
    and the prompt holds every pair of them, so a draft exists at every step after the first, and is accepted
    or rejected by chance. The expected frequencies are the model's exact probabilities (from its logits over
    each continuation, with the same bias)."""
    prompt = list(PAIRS)
    params = SamplingParams(max_new_tokens=3, temperature=1.0, logit_bias=CONFINED, ignore_eos=True)
    engine = await engines(SpeculationMode.NGRAM, max_running=16)
    expected = exact_continuations(engine, prompt, (A, B, C), dict(CONFINED))
    total, round_size = 1504, 16  # a round's prompts are prefilled in one step; its later steps verify drafts
    results = []
    for _ in range(total // round_size):
        made = [GenerationRequest("", params, prompt_ids=tuple(prompt)) for _ in range(round_size)]
        results.extend(await generate_all(engine, made))
    observed = Counter(tuple(tiny_loaded.tokenizer(r.text).input_ids) for r in results)
    assert set(observed) <= set(expected)
    assert chi_square(observed, expected, total) < CHI2_999[26]
    drafted_tokens, accepted = drafted(engine)
    assert 0 < accepted < drafted_tokens  # both branches of the rule were taken


def exact_continuations(
    engine: BatchedEngine, prompt: list[int], allowed: tuple[int, ...], bias: dict[int, float]
) -> dict[tuple[int, ...], float]:
    core = engine.core
    out: dict[tuple[int, ...], float] = {}
    for continuation in itertools.product(allowed, repeat=3):
        logits = core.score(prompt + list(continuation[:2]))[-3:].float()  # after the prompt, t1, t2
        shift = torch.zeros(logits.shape[-1])
        for token, value in bias.items():
            shift[token] = value
        logprobs = torch.log_softmax(logits + shift, dim=-1)
        out[continuation] = float(sum(logprobs[i, t] for i, t in enumerate(continuation)).exp())
    return out


async def test_grammars_hold_and_text_is_identical_when_drafts_are_verified(engines: Callable[..., Any]) -> None:
    """Constrained rows: each drafted position is masked by the grammar state after the tokens kept before it,
    so a draft the grammar refuses is never kept; outputs equal those without speculation and validate."""
    schemas: list[dict[str, Any]] = [
        {"type": "array", "items": {"enum": ["alpha", "beta", "gamma"]}, "minItems": 8, "maxItems": 24},
        *random_schemas(6, seed=5),
    ]
    off, on = await engines(SpeculationMode.OFF), await engines(SpeculationMode.NGRAM)
    prompt = 'A list: ["alpha", "beta", "alpha", "beta", "gamma", "alpha"] and {"yes": true, "no": 3}'

    def requests(engine: BatchedEngine) -> list[GenerationRequest]:
        made = []
        for i, schema in enumerate(schemas):
            constraint = Constraint.json_schema(schema)
            for params in ({"temperature": 0.0}, {"temperature": 1.0, "seed": i}):
                sampling = SamplingParams(constraint=constraint, max_new_tokens=400, **params)
                made.append(GenerationRequest(prompt, sampling, grammar=engine.grammars.compile(constraint)))
        return made

    want = await generate_all(off, requests(off))
    got = await generate_all(on, requests(on))
    for index, (a, b) in enumerate(zip(want, got, strict=True)):
        assert (b.text, b.finish_reason) == (a.text, a.finish_reason)
        assert b.finish_reason is FinishReason.STOP
        jsonschema.validate(json.loads(b.text), schemas[index // 2])
    drafted_tokens, accepted = drafted(on)
    assert 0 < accepted < drafted_tokens
