"""Pacing a long prompt's chunked prefill beside decoding streams, by measured cost.

A chunk's extra time in a decoding step is not proportional to its tokens at a fixed rate: each token
attends to every position before it (a chunk at position 5,000 costs several times one at position 0), and
a step that grows past the weight plan's row limit switches formats (int4 -> bf16) at a fixed cost. Sizing
every step's chunk to a share of the step (the former rule) either made chunks too small to pay those fixed
costs or, with a floor on their size, let each step grow by far more than the share.

So chunks interleave with decode steps: every decoding step earns ``share`` of a decode step's measured time
as credit, every step that carries prompt tokens pays what it actually cost beyond a decode step, and a
long prompt's next chunk goes only while the credit is not negative. Over any stretch of steps the prompts
add no more than about ``share`` to the streams' time (they keep ~1 / (1 + share) of their rate), whatever a
token costs where the chunk is. A chunk is sized to about ``chunk_cost`` of a decode step at the measured
cost per prompt token, never below ``min_tokens`` (a step's fixed costs are paid for enough tokens).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ChunkPacer:
    share: float  # the extra time prompts may add to decoding steps, on average, as a fraction of a step
    chunk_cost: float  # one chunk's planned extra time, as a fraction of a decode step
    min_tokens: int
    max_tokens: int  # TEXTGEN_PREFILL_CHUNK_TOKENS
    credit_s: float = 0.0

    def chunk_tokens(self, decode_step_s: float, prompt_token_s: float) -> int:
        """The next chunk's size: about ``chunk_cost`` of a decode step at the measured cost per prompt token,
        between ``min_tokens`` and ``max_tokens`` (that until both costs are measured)."""
        if decode_step_s <= 0 or prompt_token_s <= 0:
            return self.max_tokens
        planned = int(self.chunk_cost * decode_step_s / prompt_token_s)
        return max(min(self.min_tokens, self.max_tokens), min(self.max_tokens, planned))

    @property
    def chunk_due(self) -> bool:
        """Whether a long prompt's next chunk may go in this step (the prompts' earlier steps are paid for)."""
        return self.credit_s >= 0.0

    def observe(self, decode_step_s: float, step_s: float, prompt_tokens: int, chunk_tokens: int) -> None:
        """After a decoding step of ``step_s`` seconds that carried ``prompt_tokens`` prompt tokens, of which
        ``chunk_tokens`` were a chunk: earn this step's share, pay the chunk's part of what the prompts added
        (short prompts beside it are the streams' own restarts: they are not charged to the long prompt, and
        could starve it). The credit saved up is capped at one chunk's planned cost, so a long quiet stretch
        does not let a burst of chunks through."""
        if decode_step_s <= 0:  # no decode-only step measured yet: the next step is one, so there is a measure
            self.credit_s = min(self.credit_s, -1e-9) if chunk_tokens else self.credit_s
            return
        self.credit_s += self.share * decode_step_s
        if chunk_tokens:
            self.credit_s -= max(step_s - decode_step_s, 0.0) * chunk_tokens / prompt_tokens
        self.credit_s = min(self.credit_s, max(self.share, self.chunk_cost) * decode_step_s)
