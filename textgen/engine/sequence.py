"""Per-request bookkeeping shared by the engines: budget, text, finish reason, timings."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from textgen.engine.constraints import RowConstraint
from textgen.engine.sampling import RowLogprobs, TokenPenalties
from textgen.engine.speculation import SequenceDrafts
from textgen.engine.text import TextAssembler
from textgen.engine.types import (
    EngineLimits,
    FinishReason,
    GenerationRequest,
    GenerationResult,
    Handle,
    LogprobAlternative,
    LogprobEntry,
    RequestTimings,
    SamplingParams,
    prompt_token_limit,
)
from textgen.errors import InvalidRequestError, PromptTooLongError

if TYPE_CHECKING:
    from textgen.engine.prefix_cache import PrefixHit

logger = logging.getLogger(__name__)


@dataclass
class SequenceState:
    """One admitted request: its tokens so far and how it ends."""

    handle: Handle
    prompt_ids: list[int]
    budget: int
    assembler: TextAssembler
    eos_ids: frozenset[int]
    generator: torch.Generator | None
    admitted_at: float = field(default_factory=time.monotonic)
    generated: list[int] = field(default_factory=list)
    first_token_at: float | None = None
    finish_reason: FinishReason | None = None
    # Structured output: the row's grammar state (None: unconstrained); tokenizer for logprob token text.
    constraint: RowConstraint | None = None
    tokenizer: PreTrainedTokenizerBase | None = None
    # Presence/frequency penalties of the tokens generated so far (made by the engine at the row's first
    # sampling step, when it knows V); None for rows without those penalties.
    penalties: TokenPenalties | None = None
    min_tokens: int = 0
    # Speculative decoding: the row's draft index and back-off (made by the engine when it first drafts).
    speculation: SequenceDrafts | None = None
    # Prefill: the cache slot once it has one, the prompt positions it holds (a cached prefix, earlier
    # chunks), how many of them came from the prefix cache, and the cached blocks to copy in (held).
    slot: int | None = None
    prefilled: int = 0
    cached_tokens: int = 0
    prefix_hit: PrefixHit | None = None
    prefix_looked_up: bool = False

    @classmethod
    def admit(
        cls,
        handle: Handle,
        prompt_ids: list[int],
        budget: int,
        tokenizer: PreTrainedTokenizerBase,
        eos_ids: frozenset[int],
    ) -> SequenceState:
        request = handle.request
        params = request.params
        generator = None
        if params.seed is not None:
            generator = torch.Generator().manual_seed(params.seed)
        if params.constraint is not None and request.grammar is None:
            raise InvalidRequestError("This request's constraint was not compiled; submit it through the service.")
        return cls(
            handle=handle,
            prompt_ids=prompt_ids,
            budget=budget,
            assembler=TextAssembler(tokenizer, params.stop, armed=params.min_tokens == 0),
            eos_ids=frozenset() if params.ignore_eos else eos_ids,
            generator=generator,
            constraint=None if request.grammar is None else request.grammar.start(),
            tokenizer=tokenizer if params.logprobs is not None else None,
            min_tokens=params.min_tokens,
        )

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def history(self) -> list[int]:
        return self.prompt_ids + self.generated

    @property
    def ends_suppressed(self) -> bool:
        """min_tokens: the next token may be neither end-of-sequence nor complete a stop string."""
        return len(self.generated) < self.min_tokens

    def accept(self, token_id: int, logprobs: RowLogprobs = None) -> str:
        """Record a generated token; return text safe to stream. Sets finish_reason when done.

        A constrained row whose grammar is complete (nothing more may follow) ends with STOP."""
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self.generated.append(token_id)
        if self.penalties is not None:
            self.penalties.add(token_id)
        if logprobs is not None:
            self.handle.token_logprobs.append(self._token_logprob(token_id, logprobs))
        delta = ""
        ending_allowed = len(self.generated) >= self.min_tokens
        if token_id in self.eos_ids and ending_allowed:
            self.finish_reason = FinishReason.EOS
        else:
            if ending_allowed and not self.assembler.stops_armed:
                self.assembler.arm_stops()
            delta = self.assembler.push(token_id)
            if self.assembler.stopped:
                self.finish_reason = FinishReason.STOP
            elif self.constraint is not None:
                self._advance_constraint(token_id)
        if self.finish_reason is None and len(self.generated) >= self.budget:
            self.finish_reason = FinishReason.LENGTH
        if self.finish_reason is not None:
            delta += self.assembler.finish()
        return delta

    def _advance_constraint(self, token_id: int) -> None:
        assert self.constraint is not None
        if not self.constraint.advance(token_id):
            # The mask makes this unreachable; end the row rather than emit text the grammar refuses.
            logger.warning(
                "Grammar refused a generated token: %s",
                self.constraint.error,
                extra={"request_id": self.handle.request.request_id},
            )
            self.finish_reason = FinishReason.STOP
        elif self.constraint.ended:
            self.finish_reason = FinishReason.STOP

    def _token_logprob(self, token_id: int, logprobs: tuple[float, list[tuple[int, float]]]) -> LogprobEntry:
        chosen, alternatives = logprobs
        return LogprobEntry(
            token_id=token_id,
            token=self._token_text(token_id),
            logprob=chosen,
            top=tuple(LogprobAlternative(t, self._token_text(t), value) for t, value in alternatives),
        )

    def _token_text(self, token_id: int) -> str:
        assert self.tokenizer is not None
        return str(self.tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False))

    def close(self) -> str:
        """Generation ended without a finishing token (budget reached elsewhere): release held text."""
        self.finish_reason = self.finish_reason or FinishReason.LENGTH
        return self.assembler.finish()

    def result(self) -> GenerationResult:
        now = time.monotonic()
        arrived = self.handle.request.arrived_at
        return GenerationResult(
            text=self.assembler.text,
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=len(self.generated),
            finish_reason=self.finish_reason or FinishReason.LENGTH,
            token_logprobs=None if self.tokenizer is None else tuple(self.handle.token_logprobs),
            prompt_logprobs=None if self.handle.prompt_logprobs is None else tuple(self.handle.prompt_logprobs),
            cached_tokens=self.cached_tokens,
            structured=self.handle.request.params.constraint is not None,
            timings=RequestTimings(
                queue_s=self.admitted_at - arrived,
                time_to_first_token_s=None if self.first_token_at is None else self.first_token_at - arrived,
                total_s=now - arrived,
            ),
        )


def vocabulary_size(tokenizer: PreTrainedTokenizerBase, model_vocabulary: int | None = None) -> int:
    """Token ids a client may name: the tokenizer's vocabulary with its added tokens, and no more than
    the model's output layer has rows (an id past it would fail a whole batch's step)."""
    size = len(tokenizer)
    return size if model_vocabulary is None else min(size, model_vocabulary)


def _names_token_ids(request: GenerationRequest) -> bool:
    return request.prompt_ids is not None or bool(request.params.logit_bias)


def check_token_ids(prompt_ids: list[int], params: SamplingParams, vocabulary: int) -> None:
    """A token-id prompt and logit_bias name only ids of the vocabulary (an id past the model's output
    layer would fail the whole batch's step). ``vocabulary`` 0: nothing named, nothing to check."""
    if not vocabulary:
        return
    if any(not 0 <= token_id < vocabulary for token_id in prompt_ids):
        raise InvalidRequestError(
            f"prompt: token ids must be between 0 and {vocabulary - 1} (this model's vocabulary)."
        )
    if any(not 0 <= token_id < vocabulary for token_id, _ in params.logit_bias):
        raise InvalidRequestError(
            f"logit_bias: token ids must be between 0 and {vocabulary - 1} (this model's vocabulary)."
        )


def tokenize_prompt(
    tokenizer: PreTrainedTokenizerBase,
    request: GenerationRequest,
    limits: EngineLimits,
    context_length: int | None = None,
    model_vocabulary: int | None = None,
) -> tuple[list[int], int]:
    """Prompt token ids and the number of tokens to generate; rejects over-long prompts.

    The budget is capped so prompt plus output fits the model's context (a model with learned
    positions, like GPT-2, cannot go past it at all).
    """
    if request.prompt_ids is not None:
        ids = list(request.prompt_ids)
    else:
        ids = list(tokenizer(request.prompt, add_special_tokens=True).input_ids)
    if _names_token_ids(request):
        check_token_ids(ids, request.params, vocabulary_size(tokenizer, model_vocabulary))
    if not ids:
        raise InvalidRequestError("The prompt produced no tokens; send a non-empty prompt.")
    limit = prompt_token_limit(limits.max_prompt_tokens, limits.max_new_tokens_limit, context_length)
    if len(ids) > limit:
        raise PromptTooLongError(
            f"The prompt has {len(ids)} tokens; this server accepts at most {limit} "
            "(TEXTGEN_MAX_PROMPT_TOKENS and the model's context length). Shorten the prompt."
        )
    budget = request.params.token_budget(len(ids), limits.default_new_tokens, limits.max_new_tokens_limit)
    if context_length is not None:
        budget = min(budget, context_length - len(ids))
    return ids, budget

