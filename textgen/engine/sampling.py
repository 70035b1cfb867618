"""Next-token selection for a batch whose rows each have their own sampling parameters.

Small pure functions over tensors. Shapes: B = rows in the batch, V = vocabulary size.
Each row draws its random number from its own ``torch.Generator`` when the request has a seed, so a
seeded request produces the same tokens whether it runs alone or beside others.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from textgen.engine.core.fused import FusedKernels
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


class TokenPenalties:
    """A row's presence and frequency penalties so far, kept as the one vector [V] to subtract from its
    logits: each generated token adds ``frequency_penalty`` to its entry (and ``presence_penalty`` the
    first time), O(1) per token, so a step applies them with one operation instead of recomputing
    ``frequency * count + presence * (count > 0)`` over the vocabulary."""

    def __init__(self, vocabulary: int, params: SamplingParams) -> None:
        self.vector = torch.zeros(vocabulary, dtype=torch.float32)
        self._presence = params.presence_penalty
        self._frequency = params.frequency_penalty
        self._seen: set[int] = set()

    def add(self, token_id: int) -> None:
        amount = self._frequency
        if token_id not in self._seen:
            self._seen.add(token_id)
            amount += self._presence
        if amount:
            self.vector[token_id] += amount


def apply_count_penalties(
    logits: torch.Tensor, params: Sequence[SamplingParams], penalties: Sequence[TokenPenalties | None]
) -> torch.Tensor:
    """OpenAI's presence and frequency penalties, in place: each row that has them loses
    ``frequency_penalty * count + presence_penalty * (count > 0)`` per token, count = times the token was
    generated so far (``penalties[row]`` keeps that sum). One subtraction per such row; rows without
    penalties are not touched (nor need a ``TokenPenalties``)."""
    for row, p in enumerate(params):
        if p.counts_tokens:
            logits[row].sub_(_row_penalties(penalties[row], row).vector.to(logits.device))
    return logits


def _row_penalties(penalties: TokenPenalties | None, row: int) -> TokenPenalties:
    if penalties is None:
        raise ValueError(f"row {row} has a presence or frequency penalty but no token counts")
    return penalties


def apply_logit_bias(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """OpenAI's logit_bias, in place: each (token id, bias) of a row added to that row's logit, all rows
    in one scatter. Ids must be inside the vocabulary (checked when the request is admitted)."""
    rows: list[int] = []
    ids: list[int] = []
    biases: list[float] = []
    for row, p in enumerate(params):
        for token_id, bias in p.logit_bias:
            rows.append(row)
            ids.append(token_id)
            biases.append(bias)
    if rows:
        device = logits.device
        index = (
            torch.tensor(rows, dtype=torch.long, device=device),
            torch.tensor(ids, dtype=torch.long, device=device),
        )
        logits.index_put_(index, torch.tensor(biases, dtype=logits.dtype, device=device), accumulate=True)
    return logits


def apply_min_p(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """min-p truncation for sampled rows that ask: tokens with p < min_p * p_max are dropped. In logits,
    p_i / p_max = exp((l_i - l_max) / T), so the cut is l_i < l_max + T * ln(min_p). Returns a copy when
    a row asks (the caller's logits stay untruncated for log-probabilities), else ``logits`` itself."""
    rows = [row for row, p in enumerate(params) if p.min_p > 0.0 and not p.greedy]
    if not rows:
        return logits
    index = torch.tensor(rows, dtype=torch.long, device=logits.device)
    cut = torch.tensor([params[r].temperature * math.log(params[r].min_p) for r in rows], device=logits.device)
    chosen = logits[index]  # [R, V]
    floor = chosen.amax(dim=-1, keepdim=True) + cut[:, None]
    truncated = logits.clone()
    truncated[index] = chosen.masked_fill(chosen < floor, float("-inf"))
    return truncated


def suppress_tokens(logits: torch.Tensor, rows: Sequence[int], token_ids: Sequence[int]) -> torch.Tensor:
    """Ban ``token_ids`` in ``rows`` (in place), except in a row where nothing else is allowed (a grammar
    that only admits its end): min_tokens must not leave a row with no token at all."""
    if not rows or not token_ids:
        return logits
    index = torch.tensor(rows, dtype=torch.long, device=logits.device)
    banned = torch.tensor(sorted(token_ids), dtype=torch.long, device=logits.device)
    chosen = logits[index]  # [R, V]
    suppressed = chosen.index_fill(1, banned, float("-inf"))
    alive = torch.isfinite(suppressed).any(dim=-1, keepdim=True)  # [R, 1]
    logits[index] = torch.where(alive, suppressed, chosen)
    return logits


BLOCK = 64  # vocabulary entries per block: block maxima narrow the search for the top tokens
MAX_DRAWS = 8  # rejection rounds before a row falls back to the exact sort (each accepts with P >= top_p)


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


def _blocks(logits: torch.Tensor) -> torch.Tensor:
    """[B, V] -> [B, V / BLOCK, BLOCK], padding the vocabulary with -inf to a whole block."""
    rows, vocab = logits.shape
    if vocab % BLOCK:
        logits = F.pad(logits, (0, BLOCK - vocab % BLOCK), value=float("-inf"))
    return logits.view(rows, -1, BLOCK)


def top_tokens(logits: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's ``count`` highest logits, high to low: values and token ids [B, min(count, V)].

    Searched among the ``count`` blocks with the highest maxima only, which hold them all: a token
    in any other block is beaten by those blocks' maxima, ``count`` tokens already. ``topk`` over
    the blocks' few thousand entries costs a fraction of ``topk`` over the whole vocabulary.
    """
    rows, vocab = logits.shape
    blocks = _blocks(logits)  # [B, NB, BLOCK]
    if blocks.shape[1] <= count or count * BLOCK >= vocab:
        return torch.topk(logits, min(count, vocab), dim=-1)
    chosen = torch.topk(blocks.amax(dim=-1), count, dim=-1).indices  # [B, count]
    values = blocks.gather(1, chosen[..., None].expand(-1, -1, BLOCK)).reshape(rows, -1)  # [B, count * BLOCK]
    ids = (chosen[..., None] * BLOCK + torch.arange(BLOCK, device=logits.device)).reshape(rows, -1)
    values, position = torch.topk(values, count, dim=-1)
    return values, ids.gather(1, position)


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """argmax over [B, V] (first of equal maxima), via block maxima: ``amax`` vectorises, ``argmax``
    over a long row does not."""
    blocks = _blocks(logits)  # [B, NB, BLOCK]
    if blocks.shape[1] <= BLOCK:
        return logits.argmax(dim=-1)
    best_block = blocks.amax(dim=-1).argmax(dim=-1)  # [B]
    inside = blocks[torch.arange(blocks.shape[0], device=logits.device), best_block].argmax(dim=-1)  # [B]
    return best_block * BLOCK + inside


def uniform_draws(
    generators: Sequence[torch.Generator | None], shared: torch.Generator, count: int = 1
) -> torch.Tensor:
    """U(0,1) numbers per row ([B], or [B, count] when count > 1): from the row's own generator when
    seeded, else the shared one (all unseeded rows in one draw)."""
    draws = torch.rand(len(generators), count, generator=shared)  # [B, count]
    for row, generator in enumerate(generators):
        if generator is not None:
            draws[row] = torch.rand(count, generator=generator)
    return draws if count > 1 else draws[:, 0]


def sample_rows(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    shared: torch.Generator,
    kernels: FusedKernels | None = None,
) -> torch.Tensor:
    """One token per row from softmax(logits / temperature) after top-k and top-p. logits [B, V] float32
    -> token ids [B]. Rows with a top-k rank their k best tokens (``top_k_tokens``); the others are
    drawn by rejection (``nucleus_by_rejection``), which ranks nothing."""
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
    top_k = torch.tensor([p.top_k for p in params], dtype=torch.long, device=device)
    top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
    ranked = [row for row, p in enumerate(params) if p.top_k > 0]
    if not ranked:
        return nucleus_by_rejection(logits, temperature, top_p, generators, shared, kernels)
    chosen = torch.empty(len(params), dtype=torch.long, device=device)
    rows = torch.tensor(ranked, dtype=torch.long, device=device)
    chosen[rows] = top_k_tokens(
        logits[rows], temperature[rows], top_k[rows], top_p[rows], [generators[r] for r in ranked], shared
    )
    unranked = [row for row, p in enumerate(params) if p.top_k <= 0]
    if unranked:
        rows = torch.tensor(unranked, dtype=torch.long, device=device)
        chosen[rows] = nucleus_by_rejection(
            logits[rows], temperature[rows], top_p[rows], [generators[r] for r in unranked], shared, kernels
        )
    return chosen


def nucleus_by_rejection(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    generators: Sequence[torch.Generator | None],
    shared: torch.Generator,
    kernels: FusedKernels | None = None,
) -> torch.Tensor:
    """Top-p sampling without sorting: draw from the whole softmax, keep the draw if it is in the nucleus.

    A token is in the nucleus when the tokens more likely than it hold less than top_p of the mass, so
    one masked sum tests a draw, and a kept draw is distributed exactly as the nucleus (the whole
    distribution conditioned on the nucleus). A draw is kept with probability >= top_p, so rounds are
    few; rows still unlucky after MAX_DRAWS use the exact sort. Ranking tokens (topk, sort) costs more
    on a CPU than these passes over the vocabulary, whatever the nucleus' width.

    With ``kernels`` (fused.c) and float32 logits on the CPU, each row runs in one C call over its own
    logits (two passes, then block-pruned walks), with the same MAX_DRAWS numbers per row drawn up front;
    otherwise PyTorch operators do three passes per round over the whole batch.
    logits [B, V]; temperature, top_p [B] -> token ids [B].
    """
    if kernels is not None and logits.device.type == "cpu" and logits.dtype == torch.float32:
        chosen = kernels.sample_nucleus(logits, temperature, top_p, uniform_draws(generators, shared, MAX_DRAWS))
        pending = (chosen < 0).nonzero().squeeze(-1)
    else:
        chosen, pending = _rejection_rounds(logits, temperature, top_p, generators, shared)
    if pending.numel():
        chosen[pending] = _sample_sorted(
            logits[pending], temperature[pending], torch.zeros_like(pending), top_p[pending],
            [generators[r] for r in pending.tolist()], shared,
        )
    return chosen


def _rejection_rounds(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    generators: Sequence[torch.Generator | None],
    shared: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """nucleus_by_rejection in PyTorch operators -> (token ids [B], rows still without one)."""
    probs = torch.softmax(logits / temperature[:, None], dim=-1)  # [B, V]
    cdf = torch.cumsum(probs, dim=-1)  # [B, V], in vocabulary order: any order samples the same
    chosen = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    pending = torch.arange(logits.shape[0], device=logits.device)
    for _ in range(MAX_DRAWS):
        u = uniform_draws([generators[r] for r in pending.tolist()], shared).to(logits.device)  # [P]
        whole = len(pending) == len(chosen)  # the first round: no copy of the [B, V] tensors
        row_cdf, row_probs = (cdf, probs) if whole else (cdf[pending], probs[pending])
        drawn = torch.searchsorted(row_cdf, (u * row_cdf[:, -1])[:, None]).clamp_(max=logits.shape[-1] - 1)  # [P, 1]
        drawn_prob = row_probs.gather(1, drawn)  # [P, 1]
        # (where() with a scalar 0 takes a slow path: ~2x this product's time at B = 64)
        more_likely = (row_probs * (row_probs > drawn_prob)).sum(dim=-1)  # [P]
        kept = (more_likely < top_p[pending]) | (top_p[pending] >= 1.0)
        chosen[pending[kept]] = drawn[kept, 0]
        pending = pending[~kept]
        if not pending.numel():
            break
    return chosen, pending


def top_k_tokens(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    generators: Sequence[torch.Generator | None],
    shared: torch.Generator,
) -> torch.Tensor:
    """Rows with a top-k (top_k [B] > 0): rank each row's k best tokens (``top_tokens``, exact), apply
    top-p within them, sample. logits [B, V] -> token ids [B]."""
    count = min(int(top_k.max()), logits.shape[-1])
    values, token_ids = top_tokens(logits, count)  # [B, C], high to low
    ranks = torch.arange(values.shape[-1], device=logits.device)[None, :]
    kept = (values / temperature[:, None]).masked_fill(ranks >= top_k[:, None], float("-inf"))
    probs = _nucleus(torch.softmax(kept, dim=-1), top_p)  # [B, C]
    return _inverse_cdf(probs, token_ids, uniform_draws(generators, shared).to(logits.device))


def _sample_sorted(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    generators: Sequence[torch.Generator | None],
    shared: torch.Generator,
) -> torch.Tensor:
    probs, token_ids = sorted_filtered_probabilities(logits, temperature, top_k, top_p)
    return _inverse_cdf(probs, token_ids, uniform_draws(generators, shared).to(logits.device))


def _inverse_cdf(probs: torch.Tensor, token_ids: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """probs, token_ids [B, C]; u [B] in [0, 1) -> the token where each row's cumulative mass passes u."""
    cdf = torch.cumsum(probs, dim=-1)
    picked = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp_(max=probs.shape[-1] - 1)  # [B, 1]
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
    kernels: FusedKernels | None = None,
    penalties: Sequence[TokenPenalties | None] | None = None,
) -> torch.Tensor:
    """logits [B, V] (any float dtype) -> next token ids [B] (long), greedy or sampled per row.

    Each row's logits get, in order, its repetition penalty, presence/frequency penalties (``penalties``:
    per row, what the tokens generated so far cost; needed only for rows with those penalties) and
    logit_bias; then min_p truncates sampled rows. A batch where no row asks for one of these pays one
    scan of the params for each.

    With ``logprobs_out``, it is filled with one ``RowLogprobs`` per row (see ``token_logprobs``);
    rows whose params do not ask get None, and a batch where none asks costs nothing extra. ``kernels``
    (fused.c) samples top-p rows in C where available."""
    logits = apply_repetition_penalty(logits.float(), params, histories)
    logits = apply_count_penalties(logits, params, penalties if penalties is not None else [None] * len(params))
    logits = apply_logit_bias(logits, params)
    chosen = _choose(apply_min_p(logits, params), params, generators, shared, kernels)
    if logprobs_out is not None:
        logprobs_out[:] = token_logprobs(logits, params, chosen)
    return chosen


def token_logprobs(logits: torch.Tensor, params: Sequence[SamplingParams], chosen: torch.Tensor) -> list[RowLogprobs]:
    """Log-probabilities under each row's sampling distribution: softmax(logits / temperature), where
    logits already carry the penalties, logit_bias and any grammar mask; greedy rows use temperature 1.
    Top-k/top-p/min-p truncation is not applied, so the alternatives stay informative. One vectorised pass
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


PROMPT_LOGPROB_ROWS = 128  # positions per log_softmax: bounds the extra memory to 128 x V floats


def prompt_token_logprobs(
    logits: torch.Tensor, prompt_ids: Sequence[int], alternatives: int
) -> list[tuple[float, list[tuple[int, float]]]]:
    """Each prompt token's log-probability given the tokens before it, with its ``alternatives`` likeliest
    alternatives (temperature 1, no penalties: the model's own distribution, as OpenAI's echo reports).
    logits [L, V]: the logits after every prompt position -> L - 1 entries (the first token has none).
    Computed PROMPT_LOGPROB_ROWS positions at a time, so a long prompt does not double [L, V] in memory."""
    entries: list[tuple[float, list[tuple[int, float]]]] = []
    following = torch.tensor(list(prompt_ids[1:]), dtype=torch.long, device=logits.device)
    for start in range(0, len(prompt_ids) - 1, PROMPT_LOGPROB_ROWS):
        stop = min(start + PROMPT_LOGPROB_ROWS, len(prompt_ids) - 1)
        logprobs = torch.log_softmax(logits[start:stop].float(), dim=-1)  # [C, V]
        picked = logprobs.gather(-1, following[start:stop, None]).squeeze(-1).tolist()
        if not alternatives:
            entries.extend((value, []) for value in picked)
            continue
        values, ids = torch.topk(logprobs, min(alternatives, logprobs.shape[-1]), dim=-1)
        entries.extend(
            (value, list(zip(row_ids, row_values, strict=True)))
            for value, row_ids, row_values in zip(picked, ids.tolist(), values.tolist(), strict=True)
        )
    return entries


def _choose(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    shared: torch.Generator,
    kernels: FusedKernels | None,
) -> torch.Tensor:
    sampled_rows = [row for row, p in enumerate(params) if not p.greedy]
    if not sampled_rows:
        return greedy_tokens(logits)
    if len(sampled_rows) == len(params):
        return sample_rows(logits, params, generators, shared, kernels)
    chosen = greedy_tokens(logits)  # [B]
    index = torch.tensor(sampled_rows, dtype=torch.long, device=logits.device)
    chosen[index] = sample_rows(
        logits[index],
        [params[r] for r in sampled_rows],
        [generators[r] for r in sampled_rows],
        shared,
        kernels,
    )
    return chosen
