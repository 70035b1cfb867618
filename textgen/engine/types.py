"""The engine contract: what goes in, what comes out, and the handle a caller awaits.

Nothing here knows about HTTP or jobs. A caller builds a ``GenerationRequest``, calls
``engine.submit(request)`` and gets a ``Handle``: ``await handle.result()`` for the whole result,
``async for delta in handle.stream()`` for text as it is produced, ``handle.cancel()`` to stop it.
Engines run the model on their own threads and report back through ``Handle.publish`` /
``Handle.finish``, which must be called on the event loop (engines use ``call_soon_threadsafe``).
"""

from __future__ import annotations

import asyncio
import enum
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

from textgen.errors import DeadlineExceededError, EngineError, GenerationCancelledError, TextGenError

if TYPE_CHECKING:
    import torch

    from textgen.engine.constraints import CompiledGrammar, Constraint


MIN_SAMPLING_TEMPERATURE = 1e-4
ResultT = TypeVar("ResultT")


class Priority(enum.IntEnum):
    """Lower value is admitted first."""

    INTERACTIVE = 0
    BACKGROUND = 1


class FinishReason(enum.StrEnum):
    LENGTH = "length"
    STOP = "stop"
    EOS = "eos"
    # Set by the service, never the engine: the content filter matched a structured (grammar) row's
    # output, which ends there rather than carry a "[redacted]" that could break its schema.
    CONTENT_FILTER = "content_filter"


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings; honoured inside a shared batch.

    ``temperature == 0`` means greedy decoding. ``max_new_tokens`` wins over ``max_length`` (prompt
    plus generated tokens) when both are set; the engine resolves the budget once it knows the prompt
    length.
    """

    max_new_tokens: int | None = None
    max_length: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    # Structured output: the grammar the tokens must follow (see engine/constraints.py).
    constraint: Constraint | None = None
    # None: no log-probabilities; n >= 0: each token's log-probability and its n likeliest alternatives.
    logprobs: int | None = None
    # OpenAI's penalties over the tokens generated so far (not the prompt): each candidate's logit loses
    # presence_penalty once it has appeared and frequency_penalty per appearance.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # (token id, bias) added to that token's logit before sampling; -100 bans a token, +100 all but forces it.
    logit_bias: tuple[tuple[int, float], ...] = ()
    # Drop tokens whose probability is below min_p times the likeliest one's (after temperature).
    min_p: float = 0.0
    # End-of-sequence and stop strings are suppressed until this many tokens were generated.
    min_tokens: int = 0
    # None: no prompt log-probabilities; n >= 0: each prompt token's (after the first) log-probability
    # and its n likeliest alternatives, from one extra forward pass over the prompt (echo with logprobs).
    prompt_logprobs: int | None = None

    @property
    def greedy(self) -> bool:
        # Below this, logits / temperature overflows float32; the distribution is a one-hot anyway.
        return self.temperature < MIN_SAMPLING_TEMPERATURE

    @property
    def counts_tokens(self) -> bool:
        """Whether sampling needs this row's generated-token counts (presence or frequency penalty)."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def token_budget(self, prompt_tokens: int, default_new_tokens: int, limit: int) -> int:
        if self.max_new_tokens is not None:
            budget = self.max_new_tokens
        elif self.max_length is not None:
            budget = self.max_length - prompt_tokens
        else:
            budget = default_new_tokens
        return max(0, min(budget, limit))


class _HasDeadline:
    """A request's deadline from its ``timeout_s`` and ``arrived_at`` (generation and embedding alike)."""

    timeout_s: float | None
    arrived_at: float

    @property
    def deadline(self) -> float | None:
        return None if self.timeout_s is None else self.arrived_at + self.timeout_s

    def expired(self, now: float | None = None) -> bool:
        """Past its deadline (the one check both engines use)."""
        deadline = self.deadline
        return deadline is not None and (time.monotonic() if now is None else now) > deadline


@dataclass
class GenerationRequest(_HasDeadline):
    """``prompt`` is the text to continue; with ``prompt_ids`` (a prompt given as token ids) the engine
    uses those ids as they are and ``prompt`` is only their decoded text (for logs)."""

    prompt: str
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = ""
    priority: Priority = Priority.INTERACTIVE
    timeout_s: float | None = None
    arrived_at: float = field(default_factory=time.monotonic)
    # params.constraint compiled for the engine's tokenizer (by GenerationService, before submitting).
    grammar: CompiledGrammar | None = None
    prompt_ids: tuple[int, ...] | None = None
    # Whose request this is: the prefix cache matches only this tenant's cached prompts (unless shared).
    tenant: str | None = None


@dataclass(frozen=True)
class RequestTimings:
    queue_s: float
    time_to_first_token_s: float | None
    total_s: float


@dataclass(frozen=True)
class LogprobAlternative:
    token_id: int
    token: str
    logprob: float


@dataclass(frozen=True)
class LogprobEntry:
    """One generated token's log-probability under the distribution it was sampled from (after
    repetition penalty, grammar mask and temperature; before top-k/top-p), and the likeliest
    alternatives under that distribution, most likely first."""

    token_id: int
    token: str
    logprob: float
    top: tuple[LogprobAlternative, ...] = ()


@dataclass(frozen=True)
class PromptLogprob:
    """One prompt token (echo with logprobs): its text and, after the first (which nothing precedes), its
    log-probability given the tokens before it under the model's own distribution, with the likeliest
    alternatives at its position."""

    token_id: int
    token: str
    logprob: float | None
    top: tuple[LogprobAlternative, ...] = ()


@dataclass(frozen=True)
class GenerationResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason
    timings: RequestTimings
    token_logprobs: tuple[LogprobEntry, ...] | None = None
    # With params.prompt_logprobs: one entry per prompt token.
    prompt_logprobs: tuple[PromptLogprob, ...] | None = None
    # Prompt tokens whose keys/values came from the prefix cache instead of being computed.
    cached_tokens: int = 0
    # Generated under a constraint (tool calls, response_format, a grammar): the content filter must not
    # rewrite such text, so a match ends it (FinishReason.CONTENT_FILTER) instead of being redacted.
    structured: bool = False


class _Pending(Generic[ResultT]):
    """What every handle shares: the result future, the cancel flag the engine's thread reads and the
    deadline timer. Created and resolved on the event loop."""

    def __init__(self, request: _HasDeadline, loop: asyncio.AbstractEventLoop) -> None:
        self._future: asyncio.Future[ResultT] = loop.create_future()
        # Read by the inference thread every step; a plain Event is the cheap cross-thread flag.
        self._cancelled = threading.Event()
        # The deadline is answered by a timer on the event loop, not when the engine next looks: a step
        # (a long prefill, a full batch) or a long wait in the queue made 504s arrive seconds late.
        self._deadline_timer: asyncio.TimerHandle | None = None
        deadline = request.deadline
        if deadline is not None:
            self._deadline_timer = loop.call_later(max(0.0, deadline - time.monotonic()), self._expire)

    @property
    def cancel_requested(self) -> bool:
        return self._cancelled.is_set()

    @property
    def done(self) -> bool:
        return self._future.done()

    def cancel(self) -> None:
        """Ask the engine to drop this request; it leaves the batch within one step."""
        self._cancelled.set()

    async def result(self) -> ResultT:
        return await asyncio.shield(self._future)

    def finish(self, result: ResultT | None, error: BaseException | None = None) -> None:
        """The request ended, with a result or an error; later calls are ignored (call on the event loop)."""
        if self._future.done():
            return
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
        if error is not None:
            self._future.set_exception(error)
            # Nobody may be awaiting (a stream consumer already left): mark the exception retrieved.
            self._future.exception()
        else:
            assert result is not None
            self._future.set_result(result)
        self._finished()

    def _finished(self) -> None:
        """Hook: the future was just resolved."""

    def _expire(self) -> None:
        """The deadline passed: answer 504 now; the engine drops the work at its next step."""
        self._deadline_timer = None
        if not self._future.done():
            self._cancelled.set()
            self.finish(None, DeadlineExceededError())


class Handle(_Pending[GenerationResult]):
    """The caller's side of one submitted request. Created and resolved on the event loop."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(request, loop)
        self.request = request
        self._loop = loop
        self._chunks: list[str] = []
        self._progress = asyncio.Event()
        # When params.logprobs is set: one entry per generated token, appended by the engine's thread
        # before the token's text is published (so a stream consumer finds them already there).
        self.token_logprobs: list[LogprobEntry] = []
        # When params.prompt_logprobs is set: the prompt's entries, set by the engine at admission.
        self.prompt_logprobs: list[PromptLogprob] | None = None

    @property
    def text_so_far(self) -> str:
        return "".join(self._chunks)

    async def stream(self) -> AsyncIterator[str]:
        """Yield text deltas as they are produced (replaying any produced before the call)."""
        sent = 0
        while True:
            while sent < len(self._chunks):
                sent += 1
                yield self._chunks[sent - 1]
            if self._future.done():
                self._future.result()  # re-raise a failure for the consumer
                return
            self._progress.clear()
            await self._progress.wait()

    # ----- the engine's side (call on the event loop) ------------------------------------------------

    def publish(self, delta: str) -> None:
        """Text the engine produced; streams see it at once."""
        if delta and not self._future.done():
            self._chunks.append(delta)
            self._progress.set()

    def _finished(self) -> None:
        self._progress.set()

    def fail_cancelled(self) -> None:
        self.finish(None, GenerationCancelledError())


@dataclass
class EmbeddingRequest(_HasDeadline):
    """Prefill-only work: each input (token ids, already checked against the vocabulary and the context by
    the service) is run through the model once and comes back as its pooled, L2-normalised final hidden
    state. Nothing is sampled; the inputs leave the batch after the step that prefills them."""

    inputs: tuple[tuple[int, ...], ...]
    request_id: str = ""
    timeout_s: float | None = None
    arrived_at: float = field(default_factory=time.monotonic)

    @property
    def total_tokens(self) -> int:
        return sum(len(tokens) for tokens in self.inputs)


@dataclass(frozen=True)
class EmbeddingResult:
    """One vector per input, in input order: ``vectors`` [inputs, hidden size] float32, each of unit L2 norm."""

    vectors: torch.Tensor
    prompt_tokens: int
    timings: RequestTimings


class EmbeddingHandle(_Pending[EmbeddingResult]):
    """The caller's side of one embedding request (``Handle`` without streaming). Created and resolved on
    the event loop; the engine's thread reads ``cancel_requested`` and resolves it through ``finish``;
    inputs not yet prefilled when it is cancelled are skipped."""

    def __init__(self, request: EmbeddingRequest, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(request, loop)
        self.request = request


class Engine(Protocol):
    """The contract both engines implement."""

    name: str

    async def start(self) -> None: ...

    async def stop(self, grace_s: float) -> None: ...

    def submit(self, request: GenerationRequest) -> Handle: ...

    def submit_embedding(self, request: EmbeddingRequest) -> EmbeddingHandle:
        """Queue prefill-only work (``EmbeddingRequest``); 503 when the queue is full or not ready."""

    @property
    def ready(self) -> bool: ...

    def stats(self) -> EngineStats: ...

    def core_info(self) -> dict[str, object]:
        """What computes the logits: core name, weight formats, cache size (for logs and /metrics)."""

    def set_step_observer(self, observer: Callable[[int, float], None]) -> None:
        """Called with (batch size, seconds) after every decode step, on the inference thread."""


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting_interactive: int
    waiting_background: int
    tokens_per_s: float  # recent aggregate decode throughput, 0 when unknown
    draft_tokens: int = 0  # speculative decoding: tokens drafted and verified so far
    accepted_draft_tokens: int = 0  # ... and kept
    # The prefix cache since start (None: the engine keeps none): prompt tokens looked up, found cached.
    prefix_query_tokens: int | None = None
    prefix_hit_tokens: int = 0
    kv_blocks_total: int = 0  # the paged KV cache's blocks (0: a core without a block pool)
    kv_blocks_used: int = 0  # blocks held by running sequences
    preemptions: int = 0  # sequences preempted for KV blocks since start


def to_client_error(error: BaseException) -> BaseException:
    """Engine-thread exceptions become client-safe errors; TextGenErrors pass through."""
    return error if isinstance(error, TextGenError) else EngineError()


class SpeculationMode(enum.StrEnum):
    """TEXTGEN_SPECULATIVE (engine/speculation.py)."""

    AUTO = "auto"
    NGRAM = "ngram"
    OFF = "off"


@dataclass(frozen=True)
class SpeculationSettings:
    mode: SpeculationMode = SpeculationMode.AUTO
    max_draft: int = 6  # drafted tokens per sequence per step at most
    max_batch: int = 4  # auto: sequences running at most for drafting to pay (measured)


@dataclass(frozen=True)
class EngineLimits:
    """The settings an engine enforces (built from ``Settings`` by ``create_engine``)."""

    max_running: int = 64
    max_waiting: int = 256
    max_prompt_tokens: int | None = None  # None: the model's context minus max_new_tokens_limit
    max_new_tokens_limit: int = 1024
    default_new_tokens: int = 50
    max_prefill_tokens: int = 4096
    prefill_step_tokens: int = 256
    background_share: int = 4
    # Cache slots beyond max_running for prefill-only (embedding) inputs: each holds one input for the step
    # that prefills it, so embeddings keep moving while every generation slot is taken.
    embedding_slots: int = 8
    # While streams decode, embedding inputs may add about this fraction to a decode step's time (measured).
    embedding_step_share: float = 0.05
    speculation: SpeculationSettings = SpeculationSettings()
    # While sequences decode, a longer prompt (its uncached rest) is prefilled this many tokens per step.
    prefill_chunk_tokens: int = 256
    # Reuse cached prompt prefixes (where the core keeps KV blocks); shared: across tenants too.
    prefix_cache: bool = True
    prefix_cache_shared: bool = False


DEFAULT_PROMPT_TOKENS = 1024  # the prompt limit for a model that states no context length


def prompt_token_limit(configured: int | None, generation_budget: int, context_length: int | None) -> int:
    """The most prompt tokens a request may have: TEXTGEN_MAX_PROMPT_TOKENS within the model's context (one
    position left to generate), or by default the context minus the generation budget
    (TEXTGEN_MAX_NEW_TOKENS_LIMIT), never below the former default of 1024 within the context (a model with a
    short context keeps what it accepted before; its output budget is then capped by what is left)."""
    if context_length is None:
        return configured if configured is not None else DEFAULT_PROMPT_TOKENS
    if configured is not None:
        return max(1, min(configured, context_length - 1))
    return max(context_length - generation_budget, min(DEFAULT_PROMPT_TOKENS, context_length - 1), 1)
