"""The OpenAI sampling fields in the engine, over small tensors: presence/frequency penalties, logit_bias,
min_p, min_tokens' end suppression, prompt log-probabilities, and stop strings held off until armed. Each
batch mixes rows that ask with rows that do not: those must come out untouched."""

from __future__ import annotations

import math

import pytest
import torch

from tests.support.tiny_model import build_tokenizer
from textgen.engine.sampling import (
    TokenPenalties,
    apply_count_penalties,
    apply_logit_bias,
    apply_min_p,
    prompt_token_logprobs,
    select_next_tokens,
    suppress_tokens,
)
from textgen.engine.text import TextAssembler
from textgen.engine.types import SamplingParams

PLAIN = SamplingParams(temperature=0.0)


def penalties_of(tokens: list[int], vocabulary: int, params: SamplingParams) -> TokenPenalties:
    penalties = TokenPenalties(vocabulary, params)
    for token in tokens:
        penalties.add(token)
    return penalties


def test_count_penalties_follow_openai_and_skip_rows_without_them() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    params = [
        SamplingParams(frequency_penalty=0.5, presence_penalty=1.0),
        PLAIN,
        SamplingParams(presence_penalty=-1.0),
    ]
    penalties = [penalties_of([3, 3, 1], 4, params[0]), None, penalties_of([0], 4, params[2])]
    out = apply_count_penalties(logits.clone(), params, penalties)
    # token 3 seen twice: 4 - 0.5*2 - 1; token 1 once: 2 - 0.5 - 1
    assert out[0].tolist() == [1.0, 0.5, 3.0, 2.0]
    assert out[1].tolist() == [1.0, 2.0, 3.0, 4.0]  # no penalties: untouched, and needs no counts
    assert out[2].tolist() == [2.0, 2.0, 3.0, 4.0]  # a negative presence penalty encourages a seen token


def test_count_penalties_cost_nothing_without_penalties() -> None:
    logits = torch.randn(3, 8)
    assert apply_count_penalties(logits, [PLAIN] * 3, [None] * 3) is logits
    with pytest.raises(ValueError, match="no token counts"):
        apply_count_penalties(logits, [SamplingParams(frequency_penalty=1.0)], [None])


def test_logit_bias_adds_per_row() -> None:
    logits = torch.zeros(3, 5)
    params = [SamplingParams(logit_bias=((1, 100.0), (4, -100.0))), PLAIN, SamplingParams(logit_bias=((0, 2.5),))]
    out = apply_logit_bias(logits, params)
    assert out.tolist() == [[0, 100, 0, 0, -100], [0, 0, 0, 0, 0], [2.5, 0, 0, 0, 0]]


def test_min_p_drops_tokens_below_the_fraction_of_the_likeliest() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = torch.log(probs).repeat(3, 1)
    params = [SamplingParams(min_p=0.25), SamplingParams(), SamplingParams(min_p=0.25, temperature=0.0)]
    out = apply_min_p(logits, params)
    assert out is not logits  # the caller's logits stay whole for log-probabilities
    assert torch.isinf(out[0]).tolist() == [False, False, False, True]  # 0.05 < 0.25 * 0.5
    assert torch.equal(out[1], logits[1]) and torch.equal(out[2], logits[2])  # no min_p; greedy
    # At temperature 2 the distribution flattens: 0.05 survives (p_i / p_max = sqrt(0.1) > 0.25).
    hot = apply_min_p(torch.log(probs)[None], [SamplingParams(min_p=0.25, temperature=2.0)])
    assert not torch.isinf(hot).any()
    assert apply_min_p(logits, [PLAIN] * 3) is logits


def test_suppress_tokens_bans_the_ends_unless_nothing_else_is_allowed() -> None:
    logits = torch.tensor([[5.0, 1.0, 0.0], [5.0, 1.0, 0.0], [5.0, float("-inf"), float("-inf")]])
    out = suppress_tokens(logits, [0, 2], [0])
    assert out[0].tolist() == [float("-inf"), 1.0, 0.0]
    assert out[1].tolist() == [5.0, 1.0, 0.0]  # a row that did not ask
    assert out[2].tolist() == [5.0, float("-inf"), float("-inf")]  # only the end is allowed: kept


def test_select_next_tokens_mixed_batch() -> None:
    """One batch: a greedy row with a frequency penalty, a plain greedy row, a biased row."""
    logits = torch.tensor([[0.0, 3.0, 2.5], [0.0, 3.0, 2.5], [0.0, 3.0, 2.5]])
    params = [
        SamplingParams(temperature=0.0, frequency_penalty=1.0),
        PLAIN,
        SamplingParams(temperature=0.0, logit_bias=((0, 100.0),)),
    ]
    penalties = [penalties_of([1], 3, params[0]), None, None]
    shared = torch.Generator().manual_seed(0)
    chosen = select_next_tokens(logits.clone(), params, [[], [], []], [None] * 3, shared, penalties=penalties)
    assert chosen.tolist() == [2, 1, 0]


def test_select_next_tokens_min_p_sampling_is_greedy_at_one() -> None:
    logits = torch.randn(4, 50)
    params = [SamplingParams(temperature=1.5, min_p=1.0)] * 4
    shared = torch.Generator().manual_seed(0)
    chosen = select_next_tokens(logits.clone(), params, [[]] * 4, [None] * 4, shared)
    assert chosen.tolist() == logits.argmax(dim=-1).tolist()


def test_prompt_token_logprobs() -> None:
    logits = torch.randn(4, 6)
    ids = [2, 5, 0, 3]
    entries = prompt_token_logprobs(logits, ids, 2)
    reference = torch.log_softmax(logits, dim=-1)
    assert len(entries) == 3
    for position, (value, alternatives) in enumerate(entries):
        assert value == pytest.approx(reference[position, ids[position + 1]].item(), abs=1e-6)
        top = torch.topk(reference[position], 2)
        assert [token for token, _ in alternatives] == top.indices.tolist()
    assert prompt_token_logprobs(logits[:1], ids[:1], 2) == []
    assert all(alternatives == [] for _, alternatives in prompt_token_logprobs(logits, ids, 0))
    assert not any(math.isnan(value) for value, _ in entries)


def test_prompt_token_logprobs_of_a_long_prompt_in_chunks() -> None:
    logits = torch.randn(300, 7)
    ids = torch.randint(0, 7, (300,)).tolist()
    entries = prompt_token_logprobs(logits, ids, 1)
    reference = torch.log_softmax(logits, dim=-1)
    assert len(entries) == 299
    expected = reference[torch.arange(299), torch.tensor(ids[1:])]
    assert torch.allclose(torch.tensor([value for value, _ in entries]), expected, atol=1e-6)
    assert [alternatives[0][0] for _, alternatives in entries] == reference[:299].argmax(dim=-1).tolist()


def test_stop_strings_are_held_off_until_armed() -> None:
    tokenizer = build_tokenizer()
    ids = tokenizer("The quick brown fox", add_special_tokens=False).input_ids
    armed = TextAssembler(tokenizer, ["quick"])
    for token in ids:
        armed.push(token)
    assert armed.stopped and armed.text == "The "
    held = TextAssembler(tokenizer, ["quick", "fox"], armed=False)
    streamed = ""
    for position, token in enumerate(ids):
        if tokenizer.decode(ids[:position]) == "The quick brown":
            held.arm_stops()  # "quick" went by unarmed; " fox" comes after arming and stops the text
        streamed += held.push(token)
    streamed += held.finish()
    assert held.stopped and held.text == "The quick brown "
    assert streamed == held.text


def test_token_ids_are_checked_against_tokenizer_and_model_vocabulary() -> None:
    """An id past the model's output layer would fail the whole batch's step: refused at admission."""
    from textgen.engine.sequence import tokenize_prompt
    from textgen.engine.types import EngineLimits, GenerationRequest
    from textgen.errors import InvalidRequestError

    tokenizer = build_tokenizer()
    limits = EngineLimits()
    ids, _budget = tokenize_prompt(tokenizer, GenerationRequest("x", prompt_ids=(1, 2, 3)), limits)
    assert ids == [1, 2, 3]
    with pytest.raises(InvalidRequestError, match="prompt: token ids"):
        tokenize_prompt(tokenizer, GenerationRequest("x", prompt_ids=(1, len(tokenizer))), limits)
    with pytest.raises(InvalidRequestError, match="prompt: token ids"):
        tokenize_prompt(tokenizer, GenerationRequest("x", prompt_ids=(1, 300)), limits, model_vocabulary=300)
    biased = GenerationRequest("Hi", SamplingParams(logit_bias=((350, 1.0),)))
    tokenize_prompt(tokenizer, biased, limits)
    with pytest.raises(InvalidRequestError, match="logit_bias"):
        tokenize_prompt(tokenizer, biased, limits, model_vocabulary=300)
