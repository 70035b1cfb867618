"""Log-probabilities: computed from the distribution that sampled each token, only for rows that ask."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from textgen.engine.sampling import RowLogprobs, select_next_tokens, token_logprobs
from textgen.engine.scheduler import BatchedEngine
from textgen.engine.types import EngineLimits, GenerationRequest, SamplingParams


def select_with_logprobs(logits: torch.Tensor, params: list[SamplingParams], generators: list[Any]) -> Any:
    rows: list[RowLogprobs] = []
    tokens = select_next_tokens(logits, params, [[]] * len(params), generators, torch.Generator(), logprobs_out=rows)
    return tokens, rows


def _logits(rows: int = 3, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_rows_that_do_not_ask_get_nothing() -> None:
    logits = _logits()
    params = [SamplingParams(temperature=0.0)] * 3
    assert token_logprobs(logits, params, logits.argmax(-1)) == [None, None, None]


def test_greedy_top_one_is_the_chosen_token_and_alternatives_are_ordered() -> None:
    logits = _logits()
    params = [
        SamplingParams(temperature=0.0, logprobs=5),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0, logprobs=0),
    ]
    tokens, rows = select_with_logprobs(logits.clone(), params, [None] * 3)
    first, second, third = rows
    assert second is None
    assert first is not None and third is not None
    chosen, alternatives = first
    assert len(alternatives) == 5 and alternatives[0][0] == int(tokens[0])
    assert chosen == pytest.approx(alternatives[0][1])
    values = [value for _, value in alternatives]
    assert values == sorted(values, reverse=True)
    assert sum(math.exp(v) for v in values) <= 1.0 + 1e-6
    expected = torch.log_softmax(logits[0], -1)[tokens[0]]
    assert chosen == pytest.approx(float(expected), abs=1e-5)
    assert third[1] == []  # logprobs=0: the chosen token only


def test_sampled_rows_use_the_temperature_scaled_distribution() -> None:
    logits = _logits(rows=1)
    params = [SamplingParams(temperature=0.5, logprobs=3, seed=1)]
    tokens, rows = select_with_logprobs(logits.clone(), params, [torch.Generator().manual_seed(1)])
    assert rows[0] is not None
    chosen, alternatives = rows[0]
    scaled = torch.log_softmax(logits[0] / 0.5, -1)
    assert chosen == pytest.approx(float(scaled[tokens[0]]), abs=1e-5)
    assert [t for t, _ in alternatives] == scaled.topk(3).indices.tolist()


def test_refused_tokens_are_never_alternatives() -> None:
    logits = _logits(rows=1, vocab=10)
    logits[0, 3:] = float("-inf")  # as a grammar mask leaves them
    _, rows = select_with_logprobs(logits, [SamplingParams(temperature=0.0, logprobs=8)], [None])
    assert rows[0] is not None
    assert sorted(t for t, _ in rows[0][1]) == [0, 1, 2]
    assert sum(math.exp(v) for _, v in rows[0][1]) == pytest.approx(1.0, abs=1e-5)


async def test_engine_returns_one_entry_per_generated_token(tiny_loaded: Any) -> None:
    engine = BatchedEngine(tiny_loaded, EngineLimits(), warmup=False)
    await engine.start()
    try:
        asked = engine.submit(
            GenerationRequest("Hello", SamplingParams(max_new_tokens=8, temperature=0.8, logprobs=2, ignore_eos=True))
        )
        plain = engine.submit(GenerationRequest("Hello", SamplingParams(max_new_tokens=8, ignore_eos=True)))
        result, other = await asked.result(), await plain.result()
    finally:
        await engine.stop(0)
    assert other.token_logprobs is None
    assert result.token_logprobs is not None and len(result.token_logprobs) == result.completion_tokens == 8
    tokenizer = tiny_loaded.tokenizer
    assert tokenizer.decode([e.token_id for e in result.token_logprobs]) == result.text
    for entry in result.token_logprobs:
        assert entry.logprob <= 0 and len(entry.top) == 2
        assert entry.top[0].logprob >= entry.top[1].logprob
        assert entry.top[0].logprob >= entry.logprob - 1e-6
        assert math.exp(entry.top[0].logprob) + math.exp(entry.top[1].logprob) <= 1 + 1e-6
