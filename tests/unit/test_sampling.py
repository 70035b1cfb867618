"""Per-row sampling: greedy, temperature, top-k/top-p, repetition penalty, seeds."""

from __future__ import annotations

import torch

from textgen.engine.sampling import apply_repetition_penalty, nucleus_groups, select_next_tokens
from textgen.engine.types import SamplingParams

GREEDY = SamplingParams(temperature=0.0)


def _logits(rows: int = 3, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed))


def test_greedy_rows_take_the_argmax() -> None:
    logits = _logits()
    chosen = select_next_tokens(logits.clone(), [GREEDY] * 3, [[]] * 3, [None] * 3, torch.Generator())
    assert torch.equal(chosen, logits.argmax(-1))


def test_top_k_one_is_greedy_even_at_high_temperature() -> None:
    logits = _logits()
    params = [SamplingParams(temperature=5.0, top_k=1)] * 3
    for seed in range(5):
        chosen = select_next_tokens(logits.clone(), params, [[]] * 3, [None] * 3, torch.Generator().manual_seed(seed))
        assert torch.equal(chosen, logits.argmax(-1))


def test_tiny_top_p_keeps_only_the_top_token() -> None:
    logits = _logits()
    probs, _ = filtered_probabilities(logits, torch.ones(3), torch.zeros(3, dtype=torch.long), torch.full((3,), 1e-6))
    assert torch.equal(probs, torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float())


def test_top_k_limits_the_support() -> None:
    logits = _logits(rows=1)
    probs, _ = filtered_probabilities(logits, torch.ones(1), torch.tensor([5]), torch.ones(1))
    assert int((probs > 0).sum()) == 5
    assert torch.allclose(probs.sum(), torch.tensor(1.0))


def test_seeded_rows_are_reproducible_and_independent_of_neighbours() -> None:
    logits = _logits(rows=4)
    seeded = SamplingParams(temperature=1.0, seed=123)
    other = SamplingParams(temperature=1.0)

    def draw(neighbours: int) -> list[int]:
        gen = torch.Generator().manual_seed(123)
        rows = [seeded] + [other] * neighbours
        picked = []
        for _ in range(20):
            out = select_next_tokens(
                logits[: 1 + neighbours].clone(),
                rows,
                [[]] * len(rows),
                [gen] + [None] * neighbours,
                torch.Generator().manual_seed(neighbours),
            )
            picked.append(int(out[0]))
        return picked

    assert draw(0) == draw(3)
    assert len(set(draw(0))) > 1  # it really samples


def test_sampling_follows_the_distribution() -> None:
    logits = torch.tensor([[0.0, 0.0, -100.0, 2.0]])
    params = [SamplingParams(temperature=1.0)]
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(4)
    for _ in range(2000):
        counts[select_next_tokens(logits.clone(), params, [[]], [None], gen)] += 1
    assert counts[2] == 0
    expected = torch.softmax(logits[0], -1) * 2000
    assert torch.allclose(counts, expected, atol=80)


def test_repetition_penalty_lowers_seen_tokens() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    penalized = apply_repetition_penalty(logits.clone(), [SamplingParams(repetition_penalty=2.0)], [[0, 1]])
    assert torch.allclose(penalized, torch.tensor([[1.0, -4.0, 1.0]]))
    untouched = apply_repetition_penalty(logits.clone(), [SamplingParams()], [[0, 1]])
    assert torch.equal(untouched, logits)


def _dense(probs: torch.Tensor, ids: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.zeros(probs.shape[0], vocab).scatter_add_(1, ids, probs)


def filtered_probabilities(logits: torch.Tensor, *args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """nucleus_groups' rows as one [B, V] distribution (probs over vocabulary ids, so ids = arange)."""
    batch, vocab = logits.shape
    dense = torch.zeros(batch, vocab)
    for rows, probs, ids in nucleus_groups(logits, *args):
        dense[rows] = _dense(probs, ids, vocab)
    return dense, torch.arange(vocab).expand(batch, vocab)


def test_candidate_shortcut_matches_the_full_sort() -> None:
    from textgen.engine import sampling

    vocab = 2000
    peaky = torch.randn(2, vocab, generator=torch.Generator().manual_seed(1)) * 4  # nucleus within candidates
    flat = torch.randn(2, vocab, generator=torch.Generator().manual_seed(2)) * 0.01  # nucleus needs most of V
    logits = torch.cat([peaky, flat])
    temperature = torch.tensor([0.7, 1.0, 1.3, 0.9])
    for top_k, top_p in [([0, 0, 0, 0], [0.9, 0.5, 0.95, 1.0]), ([5, 0, 300, 0], [1.0, 0.9, 0.9, 0.99])]:
        k = torch.tensor(top_k)
        p = torch.tensor(top_p)
        fast = _dense(*filtered_probabilities(logits, temperature, k, p), vocab)
        exact = _dense(*sampling.sorted_filtered_probabilities(logits, temperature, k, p), vocab)
        assert torch.allclose(fast, exact, atol=1e-5)


def test_every_candidate_tier_matches_the_full_sort() -> None:
    """Rows whose nucleus fits the first candidates, needs the wide set, or needs the whole sort."""
    from textgen.engine import sampling

    vocab = 12_288
    gen = torch.Generator().manual_seed(5)
    peaky = torch.randn(1, vocab, generator=gen) * 6
    medium = torch.randn(1, vocab, generator=gen) * 3.0  # nucleus of ~600 tokens
    flat = torch.randn(1, vocab, generator=gen) * 0.01
    logits = torch.cat([peaky, medium, flat])
    temperature, top_p = torch.tensor([0.8, 1.0, 1.0]), torch.tensor([0.95, 0.85, 0.95])
    top_k = torch.zeros(3, dtype=torch.long)
    first, second = sampling.CANDIDATE_TIERS[:2]
    _, _, covered = sampling._candidate_probabilities(logits, temperature, top_k, top_p, first)
    _, _, wide_covered = sampling._candidate_probabilities(logits, temperature, top_k, top_p, second)
    assert covered.tolist() == [True, False, False] and wide_covered.tolist() == [True, True, False]
    fast = _dense(*filtered_probabilities(logits, temperature, top_k, top_p), vocab)
    exact = _dense(*sampling.sorted_filtered_probabilities(logits, temperature, top_k, top_p), vocab)
    assert torch.allclose(fast, exact, atol=1e-6)


def test_top_tokens_are_the_exact_top_k() -> None:
    from textgen.engine import sampling

    logits = torch.randn(4, 10_000, generator=torch.Generator().manual_seed(6))
    values, ids = sampling.top_tokens(logits, 300)
    expected_values, expected_ids = torch.topk(logits, 300, dim=-1)
    assert torch.equal(values, expected_values) and torch.equal(ids, expected_ids)
