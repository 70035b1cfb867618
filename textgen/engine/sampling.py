"""Next-token selection for a batch whose rows each have their own sampling parameters.

Small pure functions over tensors. Shapes: B = rows in the batch, V = vocabulary size.
Each row draws its random number from its own ``torch.Generator`` when the request has a seed, so a
seeded request produces the same tokens whether it runs alone or beside others.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

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


BLOCK = 64  # vocabulary entries per block when looking for candidates
CANDIDATE_BLOCKS = 64  # blocks kept: up to 4,096 candidate tokens per row (covers 60 of 64 real rows at top_p 0.95)


def sorted_filtered_probabilities(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact reference: sort the whole vocabulary, then apply top-k and top-p.

    logits [B, V]; temperature, top_p [B] float; top_k [B] long (0 = no limit).
    Returns probs [B, V] (sorted high to low, zero outside the kept set, rows sum to 1) and the
    matching token ids [B, V].
    """
    sorted_logits, token_ids = torch.sort(logits / temperature[:, None], dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device)[None, :]  # [1, V]
    k = torch.where(top_k > 0, top_k, logits.shape[-1])[:, None]  # [B, 1]
    sorted_logits = sorted_logits.masked_fill(ranks >= k, float("-inf"))
    return _nucleus(torch.softmax(sorted_logits, dim=-1), top_p), token_ids


def _nucleus(sorted_probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Zero every token after the smallest prefix holding top_p of the mass (the first always stays)."""
    ranks = torch.arange(sorted_probs.shape[-1], device=sorted_probs.device)[None, :]
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    kept = sorted_probs.masked_fill((mass_before >= top_p[:, None]) & (ranks > 0), 0.0)
    return kept / kept.sum(dim=-1, keepdim=True)


def filtered_probabilities(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same result as ``sorted_filtered_probabilities`` without sorting the whole vocabulary.

    Sorting (or even ``topk`` over) 50k logits per row per step is the slowest part of sampling on a
    CPU. A language model's nucleus almost always lies within its few hundred most likely tokens, so
    only a candidate set is ranked: every token above a per-row threshold (``top_candidates``). Rows
    whose nucleus or top-k is not inside it fall back to the full sort, so the result stays exact.
    Returns probs [B, C] and token ids [B, C], with C <= V candidates per row.
    """
    values, token_ids = top_candidates(logits)  # [B, C] sorted high to low, -inf past the row's set
    count = values.shape[-1]
    ranks = torch.arange(count, device=logits.device)[None, :]
    limited = top_k > 0
    in_set = torch.isfinite(values).sum(dim=-1)  # [B]
    values = values.masked_fill(ranks >= torch.where(limited, top_k, count)[:, None], float("-inf"))
    # top-k rows normalise over their k candidates; the others need the whole vocabulary's mass.
    probs = torch.softmax(values / temperature[:, None], dim=-1)  # [B, C]
    if not bool(limited.all()):
        whole = torch.softmax(logits / temperature[:, None], dim=-1).gather(1, token_ids)  # [B, C]
        probs = torch.where(limited[:, None], probs, whole.masked_fill(values == float("-inf"), 0.0))
    covered = torch.where(limited, top_k <= in_set, probs.sum(dim=-1) >= top_p)
    if bool(covered.all()):
        return _nucleus(probs, top_p), token_ids
    return _with_full_vocabulary_rows(logits, temperature, top_k, top_p, covered, _nucleus(probs, top_p), token_ids)


def _blocks(logits: torch.Tensor) -> torch.Tensor:
    """[B, V] -> [B, V / BLOCK, BLOCK], padding the vocabulary with -inf to a whole block."""
    rows, vocab = logits.shape
    if vocab % BLOCK:
        logits = F.pad(logits, (0, BLOCK - vocab % BLOCK), value=float("-inf"))
    return logits.view(rows, -1, BLOCK)


def top_candidates(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every token whose logit beats every token outside the set, sorted high to low.

    The vocabulary is cut into blocks; the CANDIDATE_BLOCKS blocks with the highest maxima are kept,
    and within them only tokens above the best block left out (so nothing outside the set can rank
    higher). Returns values [B, C] (-inf for dropped positions) and token ids [B, C].
    """
    blocks = _blocks(logits)  # [B, NB, BLOCK]
    rows, count = blocks.shape[0], blocks.shape[1]
    if count <= CANDIDATE_BLOCKS:
        values, ids = torch.sort(logits, dim=-1, descending=True)
        return values, ids
    block_max, order = torch.topk(blocks.amax(dim=-1), CANDIDATE_BLOCKS + 1, dim=-1)  # [B, K + 1]
    threshold = block_max[:, -1:]  # the best block left out
    chosen = order[:, :-1]  # [B, K]
    offsets = torch.arange(BLOCK, device=logits.device)
    values = blocks.gather(1, chosen[..., None].expand(-1, -1, BLOCK)).reshape(rows, -1)  # [B, K * BLOCK]
    ids = (chosen[..., None] * BLOCK + offsets).reshape(rows, -1)
    values = values.masked_fill(values <= threshold, float("-inf"))
    values, position = torch.sort(values, dim=-1, descending=True)
    return values, ids.gather(1, position)


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """argmax over [B, V] (first of equal maxima), via block maxima: ``amax`` vectorises, ``argmax``
    over a long row does not."""
    blocks = _blocks(logits)  # [B, NB, BLOCK]
    if blocks.shape[1] <= CANDIDATE_BLOCKS:
        return logits.argmax(dim=-1)
    best_block = blocks.amax(dim=-1).argmax(dim=-1)  # [B]
    inside = blocks[torch.arange(blocks.shape[0], device=logits.device), best_block].argmax(dim=-1)  # [B]
    return best_block * BLOCK + inside


def _with_full_vocabulary_rows(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    covered: torch.Tensor,
    candidate_probs: torch.Tensor,
    candidate_ids: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Widen to [B, V]: covered rows keep their candidates; plain-temperature rows (top_p = 1) use
    the unsorted softmax; only rows with a wide nucleus pay for a full sort."""
    batch, vocab = logits.shape
    count = candidate_probs.shape[-1]
    probs = torch.zeros((batch, vocab), dtype=candidate_probs.dtype, device=logits.device)
    ids = torch.arange(vocab, device=logits.device).expand(batch, vocab).clone()
    probs[covered, :count] = candidate_probs[covered]
    ids[covered, :count] = candidate_ids[covered]
    whole = ~covered & (top_p >= 1.0)
    probs[whole] = torch.softmax(logits[whole] / temperature[whole, None], dim=-1)
    wide = ~covered & (top_p < 1.0)
    if bool(wide.any()):
        probs[wide], ids[wide] = sorted_filtered_probabilities(
            logits[wide], temperature[wide], top_k[wide], top_p[wide]
        )
    return probs, ids


def uniform_draws(generators: Sequence[torch.Generator | None], shared: torch.Generator) -> torch.Tensor:
    """One U(0,1) number per row: from the row's own generator when seeded, else the shared one
    (all unseeded rows in one draw)."""
    draws = torch.rand(len(generators), generator=shared)  # [B]
    for row, generator in enumerate(generators):
        if generator is not None:
            draws[row] = torch.rand(1, generator=generator)
    return draws


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
    cdf = torch.cumsum(probs, dim=-1)  # [B, C]
    u = uniform_draws(generators, shared).to(device)[:, None]  # [B, 1]
    picked = torch.searchsorted(cdf, u * cdf[:, -1:]).clamp_(max=probs.shape[-1] - 1)  # [B, 1]
    return token_ids.gather(-1, picked).squeeze(-1)


# Per row: None when the row did not ask, else (chosen token's log-probability, [(token id, log-probability)]
# for its likeliest alternatives, most likely first).
RowLogprobs = tuple[float, list[tuple[int, float]]] | None


def select_next_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    histories: Sequence[Sequence[int]],
    generators: Sequence[torch.Generator | None],
    shared: torch.Generator,
    logprobs_out: list[RowLogprobs] | None = None,
) -> torch.Tensor:
    """logits [B, V] (any float dtype) -> next token ids [B] (long), greedy or sampled per row.

    With ``logprobs_out``, it is filled with one ``RowLogprobs`` per row (see ``token_logprobs``);
    rows whose params do not ask get None, and a batch where none asks costs nothing extra."""
    logits = apply_repetition_penalty(logits.float(), params, histories)
    chosen = _choose(logits, params, generators, shared)
    if logprobs_out is not None:
        logprobs_out[:] = token_logprobs(logits, params, chosen)
    return chosen


def token_logprobs(logits: torch.Tensor, params: Sequence[SamplingParams], chosen: torch.Tensor) -> list[RowLogprobs]:
    """Log-probabilities under each row's sampling distribution: softmax(logits / temperature), where
    logits already carry the repetition penalty and any grammar mask; greedy rows use temperature 1.
    Top-k/top-p truncation is not applied, so the alternatives stay informative. One vectorised pass
    over the rows that asked; refused (-inf) alternatives are left out."""
    asked = [row for row, p in enumerate(params) if p.logprobs is not None]
    out: list[RowLogprobs] = [None] * len(params)
    if not asked:
        return out
    index = torch.tensor(asked, dtype=torch.long, device=logits.device)
    temperature = torch.tensor(
        [params[r].temperature if not params[r].greedy else 1.0 for r in asked], device=logits.device
    )
    logprobs = torch.log_softmax(logits[index] / temperature[:, None], dim=-1)  # [A, V]
    picked = logprobs.gather(-1, chosen[index][:, None]).squeeze(-1).tolist()  # [A]
    widest = min(max(params[r].logprobs or 0 for r in asked), logprobs.shape[-1])
    top_values, top_ids = torch.topk(logprobs, widest, dim=-1) if widest else (None, None)
    for slot, row in enumerate(asked):
        alternatives: list[tuple[int, float]] = []
        if top_values is not None and top_ids is not None:
            count = params[row].logprobs or 0
            pairs = zip(top_ids[slot, :count].tolist(), top_values[slot, :count].tolist(), strict=True)
            alternatives = [(token, value) for token, value in pairs if value != float("-inf")]
        out[row] = (picked[slot], alternatives)
    return out


def _choose(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    shared: torch.Generator,
) -> torch.Tensor:
    sampled_rows = [row for row, p in enumerate(params) if not p.greedy]
    if not sampled_rows:
        return greedy_tokens(logits)
    if len(sampled_rows) == len(params):
        return sample_rows(logits, params, generators, shared)
    chosen = greedy_tokens(logits)  # [B]
    index = torch.tensor(sampled_rows, dtype=torch.long, device=logits.device)
    chosen[index] = sample_rows(
        logits[index],
        [params[r] for r in sampled_rows],
        [generators[r] for r in sampled_rows],
        shared,
    )
    return chosen
