"""Next-token selection for a batch whose rows each have their own sampling parameters.

Small pure functions over tensors. Shapes: B = rows in the batch, V = vocabulary size.
Each row draws its random number from its own ``torch.Generator`` when the request has a seed, so a
seeded request produces the same tokens whether it runs alone or beside others.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from textgen.engine.types import SamplingParams


def apply_repetition_penalty(
    logits: torch.Tensor, params: Sequence[SamplingParams], histories: Sequence[Sequence[int]]
) -> torch.Tensor:
    """CTRL-style penalty: seen tokens' positive logits are divided, negative ones multiplied."""
    for row, (p, history) in enumerate(zip(params, histories, strict=True)):
        if p.repetition_penalty == 1.0 or not history:
            continue
        seen = torch.tensor(sorted(set(history)), dtype=torch.long, device=logits.device)  # [S]
        values = logits[row, seen]
        logits[row, seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
    return logits


def filtered_probabilities(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities sorted high to low after temperature, top-k and top-p; and their token ids.

    logits [B, V]; temperature, top_p [B] float; top_k [B] long (0 = no limit).
    Returns probs [B, V] (zero outside the kept set, rows sum to 1) and token_ids [B, V].
    """
    sorted_logits, token_ids = torch.sort(logits / temperature[:, None], dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device)[None, :]  # [1, V]
    k = torch.where(top_k > 0, top_k, logits.shape[-1])[:, None]  # [B, 1]
    sorted_logits = sorted_logits.masked_fill(ranks >= k, float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # [B, V]
    # The top token is always kept, so top_p never empties a row.
    probs = probs.masked_fill((mass_before >= top_p[:, None]) & (ranks > 0), 0.0)
    return probs / probs.sum(dim=-1, keepdim=True), token_ids


def uniform_draws(generators: Sequence[torch.Generator | None], shared: torch.Generator) -> torch.Tensor:
    """One U(0,1) number per row: from the row's own generator when seeded, else the shared one."""
    draws = [torch.rand(1, generator=g if g is not None else shared) for g in generators]
    return torch.cat(draws)  # [B]


def sample_rows(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    shared: torch.Generator,
) -> torch.Tensor:
    """Inverse-CDF sampling, one token per row. logits [B, V] float32 -> token ids [B]."""
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
    top_k = torch.tensor([p.top_k for p in params], dtype=torch.long, device=device)
    top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
    probs, token_ids = filtered_probabilities(logits, temperature, top_k, top_p)
    cdf = torch.cumsum(probs, dim=-1)  # [B, V]
    u = uniform_draws(generators, shared).to(device)[:, None]  # [B, 1]
    picked = torch.searchsorted(cdf, u * cdf[:, -1:]).clamp_(max=logits.shape[-1] - 1)  # [B, 1]
    return token_ids.gather(-1, picked).squeeze(-1)


def select_next_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    histories: Sequence[Sequence[int]],
    generators: Sequence[torch.Generator | None],
    shared: torch.Generator,
) -> torch.Tensor:
    """logits [B, V] (any float dtype) -> next token ids [B] (long), greedy or sampled per row."""
    logits = apply_repetition_penalty(logits.float(), params, histories)
    chosen = torch.argmax(logits, dim=-1)  # [B]
    sampled_rows = [row for row, p in enumerate(params) if not p.greedy]
    if sampled_rows:
        index = torch.tensor(sampled_rows, dtype=torch.long, device=logits.device)
        chosen[index] = sample_rows(
            logits[index],
            [params[r] for r in sampled_rows],
            [generators[r] for r in sampled_rows],
            shared,
        )
    return chosen
