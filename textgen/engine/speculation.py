"""Speculative decoding without a second model: drafts looked up in the text so far, verified in one step.

At one stream a decode step is bound by reading the weights, so scoring a few more tokens in the same step
costs little (on SmolLM2 at 2 cores: ~10 ms for one token, ~13 ms for six). When the next tokens are
predictable from the prompt and the text so far (code edits, quoting, repeating a passage, structured
output), a sequence feeds its last token and up to k drafted tokens; the core scores all k + 1 positions
(``DecodeCore.extend``) and the scheduler keeps the longest run of drafts the model agrees with, plus one
token of its own, then rolls the cache back past the rest (``DecodeCore.truncate``).

Drafts (prompt lookup, "n-gram" drafting): the last n tokens (n = LARGEST_NGRAM down to SMALLEST_NGRAM) are
looked up among earlier positions of the prompt and the generated text; the tokens that followed their most
recent earlier occurrence are the draft. ``NgramIndex`` keeps, for every n-gram seen, where it last occurred,
updated as tokens arrive, so a lookup costs a few dictionary reads whatever the length.

Verification keeps the model's distribution exactly. For a draft drawn from a distribution q, the standard
rule accepts draft token d with probability min(1, p(d) / q(d)) and, on rejection, samples from the residual
max(0, p - q) normalised (``accept_or_resample``: the general rule, ready for a draft model). An n-gram draft is
a point mass (q(d) = 1), for which the rule reads: accept with probability p(d), else sample from p without d.
Sampling x ~ p and accepting the draft when x == d is exactly that rule (P(accept) = p(d); a rejected step emits
x, distributed as p given x != d), and it is what the scheduler does: each position's token is chosen by the
very sampling path a plain step uses (penalties, logit_bias, grammar masks, min_tokens, logprobs), drawing the
same random numbers, so greedy and seeded text are identical with speculation on or off (given logits that do
not depend on the step's size: see ``DecodeCore.uniform_rows``).

``auto`` drafts while few sequences run (a step's cost grows with its tokens once arithmetic, not weight reads,
bounds it) and backs off a sequence whose drafts keep failing: after a verification that kept no draft it skips
2, 4, 8 ... (at most MAX_PAUSE) steps. A sequence's draft length maximises its expected tokens per unit of step
time (``best_length``), from its measured acceptance rate and what a drafted token adds to a step. ``ngram`` always
drafts where a lookup finds something, at any batch size; ``off`` never.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from textgen.engine.types import SpeculationMode, SpeculationSettings

SMALLEST_NGRAM = 2  # a single token predicts the next one too poorly to pay for its verification
LARGEST_NGRAM = 4
MAX_PAUSE = 64  # steps a sequence whose drafts keep failing waits at most before trying again
# What one drafted token adds to a one-sequence step, as a share of that step (SmolLM2 int4 + fused step, 2 cores:
# 1 token 9.5 ms, 2: 10.5, 4: 12.8, 6: 13.9, 8: 15.2; the verification's sampling adds a little per position).
DRAFT_COST = 0.1
# A sequence's acceptance rate per drafted token: a decaying count of kept drafts over drafts tried, from a prior
# of 0.6 (worth two tokens) so that a first draft is a few tokens long.
PRIOR_KEPT, PRIOR_TRIED, DECAY = 1.2, 2.0, 0.7


def best_length(rate: float, most: int, cost: float = DRAFT_COST) -> int:
    """The draft length that maximises expected tokens per unit of step time when each drafted token is kept with
    probability ``rate`` (a run: the first rejection ends it): (1 + r + ... + r^k) / (1 + cost * k); 0 when no
    draft beats a plain step."""
    best, best_gain, expected, term = 0, 1.0, 1.0, 1.0
    for length in range(1, most + 1):
        term *= rate
        expected += term
        gain = expected / (1 + cost * length)
        if gain > best_gain:
            best, best_gain = length, gain
    return best


class NgramIndex:
    """The tokens of one sequence, and for each n-gram (n in [smallest, largest]) the position just after its
    most recent occurrence that something followed."""

    def __init__(self, smallest: int = SMALLEST_NGRAM, largest: int = LARGEST_NGRAM) -> None:
        if not 1 <= smallest <= largest:
            raise ValueError("n-gram sizes must satisfy 1 <= smallest <= largest")
        self._smallest, self._largest = smallest, largest
        self._tokens: list[int] = []
        self._after: dict[tuple[int, ...], int] = {}

    def __len__(self) -> int:
        return len(self._tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        for token in tokens:
            end = len(self._tokens)  # the new token's position: the n-grams ending before it now have a follower
            self._tokens.append(token)
            for n in range(self._smallest, min(self._largest, end) + 1):
                self._after[tuple(self._tokens[end - n : end])] = end

    def propose(self, limit: int) -> list[int]:
        """Up to ``limit`` tokens that followed the longest suffix seen before; [] when none was."""
        if limit <= 0:
            return []
        for n in range(min(self._largest, len(self._tokens)), self._smallest - 1, -1):
            at = self._after.get(tuple(self._tokens[-n:]))
            if at is not None:
                return self._tokens[at : at + limit]
        return []


@dataclass
class SequenceDrafts:
    """One sequence's drafting state: its index, its acceptance rate (which sets its draft length) and its
    back-off."""

    index: NgramIndex = field(default_factory=NgramIndex)
    kept: float = PRIOR_KEPT  # decaying counts behind the acceptance rate
    tried: float = PRIOR_TRIED
    misses: int = 0  # verifications in a row that kept no draft
    pause: int = 0  # steps to skip before drafting again
    drafted: int = 0
    accepted: int = 0

    @property
    def rate(self) -> float:
        return self.kept / self.tried

    def sync(self, prompt: Sequence[int], generated: Sequence[int]) -> None:
        """Index the tokens added since the last call (the prompt first, then what was generated)."""
        seen = len(self.index)
        if seen < len(prompt):
            self.index.extend(prompt[seen:])
            seen = len(prompt)
        self.index.extend(generated[seen - len(prompt) :])

    def record(self, drafted: int, accepted: int, *, back_off: bool, most: int) -> None:
        """A verification kept ``accepted`` of ``drafted`` tokens (a run of successes, then a failure unless all
        were kept). With ``back_off``, one that kept nothing, or a rate at which no draft pays, pauses drafting:
        2, 4, 8 ... steps, at most MAX_PAUSE."""
        self.drafted += drafted
        self.accepted += accepted
        self.kept = DECAY * self.kept + accepted
        self.tried = DECAY * self.tried + accepted + (accepted < drafted)
        self.misses = 0 if accepted else self.misses + 1
        if back_off and (self.misses or best_length(self.rate, most) == 0):
            self.pause = min(2 ** max(self.misses, 1), MAX_PAUSE)

    def length(self, most: int) -> int:
        """The next draft's length: the best for the acceptance rate, at least one (a probe)."""
        return max(1, best_length(self.rate, most))


class Drafter:
    """Chooses each running sequence's draft for the next step (the scheduler's side of speculation)."""

    def __init__(self, settings: SpeculationSettings) -> None:
        self.settings = settings
        self.drafted = 0  # totals, for /metrics
        self.accepted = 0

    @property
    def enabled(self) -> bool:
        return self.settings.mode is not SpeculationMode.OFF and self.settings.max_draft > 0

    def applies(self, batch: int) -> bool:
        """Whether a step of ``batch`` sequences may carry drafts at all."""
        auto = self.settings.mode is SpeculationMode.AUTO
        return self.enabled and batch > 0 and not (auto and batch > self.settings.max_batch)

    def drafts(
        self,
        states: Sequence[SequenceDrafts],
        histories: Sequence[tuple[Sequence[int], Sequence[int]]],
        rooms: Sequence[int],
        step_room: int,
    ) -> list[list[int]]:
        """A draft per sequence (often empty). ``histories``: each sequence's (prompt, generated);
        ``rooms``: the most tokens each may draft (its remaining budget and cache room, less the token of its
        own every step yields); ``step_room``: drafted tokens the whole step may carry."""
        none: list[list[int]] = [[] for _ in states]
        if step_room <= 0 or not self.applies(len(states)):
            return none
        drafts = none
        for row, (state, (prompt, generated), room) in enumerate(zip(states, histories, rooms, strict=True)):
            if state.pause > 0:
                state.pause -= 1
                continue
            limit = min(room, state.length(self.settings.max_draft), step_room)
            if limit <= 0:
                continue
            state.sync(prompt, generated)
            drafts[row] = state.index.propose(limit)
            step_room -= len(drafts[row])
        return drafts

    def record(self, state: SequenceDrafts, drafted: int, accepted: int) -> None:
        if not drafted:
            return
        self.drafted += drafted
        self.accepted += accepted
        back_off = self.settings.mode is SpeculationMode.AUTO
        state.record(drafted, accepted, back_off=back_off, most=self.settings.max_draft)


def accept_or_resample(
    target: torch.Tensor, draft: torch.Tensor, token: int, generator: torch.Generator | None = None
) -> tuple[bool, int]:
    """The standard speculative-sampling rule for one position: ``target`` p and ``draft`` q [V] are
    probabilities, ``token`` was drawn from q. Accept it with probability min(1, p(token) / q(token)); else
    draw from max(0, p - q) normalised. Returns (accepted, the token to emit). The emitted token is distributed
    exactly as p whatever q is."""
    p_token, q_token = float(target[token]), float(draft[token])
    u = float(torch.rand((), generator=generator))
    if q_token > 0 and u * q_token < p_token:
        return True, token
    residual = (target - draft).clamp_(min=0)
    if float(residual.sum()) <= 0:  # p == q: nothing left to correct (only reachable through rounding)
        residual = target.clone()
    return False, int(torch.multinomial(residual, 1, generator=generator))
