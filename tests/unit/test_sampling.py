"""Per-row sampling: greedy, temperature, top-k/top-p, repetition penalty, seeds."""

from __future__ import annotations

import pytest
import torch

from textgen.engine import sampling
from textgen.engine.core.fused import FusedKernels, load_fused_kernels
from textgen.engine.sampling import apply_repetition_penalty, select_next_tokens
from textgen.engine.types import SamplingParams

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def fused_kernels(tmp_path_factory: pytest.TempPathFactory) -> FusedKernels:
    built = load_fused_kernels(tmp_path_factory.mktemp("fused"))
    assert built is not None, "the fused kernels did not build (is gcc installed?)"
    return built


@pytest.fixture(params=["pytorch", "fused"])
def kernels(request: pytest.FixtureRequest) -> FusedKernels | None:
    """Both implementations of top-p by rejection: PyTorch operators and fused.c's sample_nucleus."""
    return request.getfixturevalue("fused_kernels") if request.param == "fused" else None


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


def draw_many(
    logits: torch.Tensor, params: SamplingParams, draws: int, seed: int = 0, kernels: FusedKernels | None = None
) -> torch.Tensor:
    """Token counts [V] from ``draws`` independent samples of one row (as one batch of identical rows)."""
    batch = logits.expand(draws, -1).clone()
    chosen = select_next_tokens(batch, [params] * draws, [[]] * draws, [None] * draws,
                                torch.Generator().manual_seed(seed), kernels=kernels)
    return torch.bincount(chosen, minlength=logits.shape[-1]).float()


def reference_distribution(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The exact sampling distribution [V] of one row, from the full sort."""
    probs, ids = sampling.sorted_filtered_probabilities(
        logits, torch.tensor([params.temperature]), torch.tensor([params.top_k]), torch.tensor([params.top_p])
    )
    return torch.zeros(logits.shape[-1]).scatter_add_(0, ids[0], probs[0])


def test_tiny_top_p_keeps_only_the_top_token() -> None:
    logits = _logits(rows=1)
    counts = draw_many(logits, SamplingParams(temperature=1.0, top_p=1e-6), draws=500)
    assert counts[logits.argmax()] == 500


def test_top_k_limits_the_support() -> None:
    logits = _logits(rows=1)
    counts = draw_many(logits, SamplingParams(temperature=2.0, top_k=5), draws=2000)
    assert set(counts.nonzero().flatten().tolist()) == set(logits[0].topk(5).indices.tolist())


def test_sampled_frequencies_match_the_sorted_reference(kernels: FusedKernels | None) -> None:
    """Rejection (no top-k) and ranked top-k rows, peaky and flat rows: 20,000 draws pass a chi-square test
    against the exact distribution (threshold: mean + 6 standard deviations of the statistic, so a
    correct sampler fails about once in 10^8 runs, while a wrong nucleus boundary fails by far)."""
    peaky, flat = _logits(rows=1, vocab=200, seed=1) * 3, _logits(rows=1, vocab=200, seed=2) * 0.3
    cases = [
        (peaky, SamplingParams(temperature=0.8, top_p=0.9)),
        (peaky, SamplingParams(temperature=1.3, top_p=0.5)),
        (flat, SamplingParams(temperature=1.0, top_p=0.95)),
        (flat, SamplingParams(temperature=1.0)),
        (peaky, SamplingParams(temperature=0.9, top_k=20, top_p=0.8)),
    ]
    for logits, params in cases:
        counts = draw_many(logits, params, draws=20_000, seed=3, kernels=kernels)
        expected = reference_distribution(logits, params)
        assert bool((counts[expected == 0] == 0).all()), params  # nothing outside the nucleus
        support = expected > 0
        expected_counts = expected[support] * counts.sum()
        chi_square = float(((counts[support] - expected_counts) ** 2 / expected_counts).sum())
        freedom = int(support.sum()) - 1
        assert chi_square < freedom + 6 * (2 * freedom) ** 0.5, (params, chi_square, freedom)


def test_rows_still_rejected_after_the_last_draw_use_the_exact_sort(
    monkeypatch: pytest.MonkeyPatch, kernels: FusedKernels | None
) -> None:
    """A flat row with a tiny top_p keeps ~1% of draws: most rows run out of rounds and fall back."""
    monkeypatch.setattr(sampling, "MAX_DRAWS", 2)
    logits = _logits(rows=1, vocab=1000, seed=4) * 0.01
    params = SamplingParams(temperature=1.0, top_p=0.01)
    counts = draw_many(logits, params, draws=3000, kernels=kernels)
    expected = reference_distribution(logits, params)
    assert bool((counts[expected == 0] == 0).all())
    assert int((expected > 0).sum()) > 5 and int((counts > 0).sum()) > 5


def test_seeded_rows_are_reproducible_and_independent_of_neighbours(kernels: FusedKernels | None) -> None:
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
                kernels=kernels,
            )
            picked.append(int(out[0]))
        return picked

    assert draw(0) == draw(3)
    assert len(set(draw(0))) > 1  # it really samples


def test_sampling_follows_the_distribution(kernels: FusedKernels | None) -> None:
    logits = torch.tensor([[0.0, 0.0, -100.0, 2.0]])
    params = [SamplingParams(temperature=1.0)]
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(4)
    for _ in range(2000):
        counts[select_next_tokens(logits.clone(), params, [[]], [None], gen, kernels=kernels)] += 1
    assert counts[2] == 0
    expected = torch.softmax(logits[0], -1) * 2000
    assert torch.allclose(counts, expected, atol=80)


def test_refused_tokens_are_never_drawn(kernels: FusedKernels | None) -> None:
    """-inf logits (a grammar's mask) hold no mass, also in fused.c, which is built with -ffast-math."""
    logits = _logits(rows=1, vocab=300, seed=5) * 2
    refused = torch.arange(0, 300, 3)
    logits[0, refused] = float("-inf")
    logits[0, 150:] = float("-inf")  # whole blocks of 64 refused, too
    for params in (SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_p=0.9)):
        counts = draw_many(logits, params, draws=4000, seed=6, kernels=kernels)
        assert counts[refused].sum() == 0 and counts[150:].sum() == 0
        assert int((counts > 0).sum()) > 5  # and it still samples among the rest


def test_repetition_penalty_lowers_seen_tokens() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    penalized = apply_repetition_penalty(logits.clone(), [SamplingParams(repetition_penalty=2.0)], [[0, 1]])
    assert torch.allclose(penalized, torch.tensor([[1.0, -4.0, 1.0]]))
    untouched = apply_repetition_penalty(logits.clone(), [SamplingParams()], [[0, 1]])
    assert torch.equal(untouched, logits)


def test_top_tokens_are_the_exact_top_k() -> None:
    from textgen.engine import sampling

    logits = torch.randn(4, 10_000, generator=torch.Generator().manual_seed(6))
    values, ids = sampling.top_tokens(logits, 300)
    expected_values, expected_ids = torch.topk(logits, 300, dim=-1)
    assert torch.equal(values, expected_values) and torch.equal(ids, expected_ids)
