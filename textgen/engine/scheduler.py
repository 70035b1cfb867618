"""Continuous (iteration-level) batching: one inference thread, one decode step for everyone.

The thread loops: drop waiting requests that were cancelled or expired → admit waiting requests
into the prefill backlog → retire finished sequences → one forward pass that decodes every running
sequence and prefills the backlog's next prompts (up to ``prefill_step_tokens``) → retire again.
New requests join between steps, so nobody waits for a whole batch to finish, and a burst of
prompts is spread over a few steps: the running sequences keep moving and the first prompts of the
burst answer after one short step, not after the whole burst. All results cross back to the event
loop in one ``call_soon_threadsafe`` per iteration.

This module decides who runs; the model core (``engine/core``) only computes logits for the cache
slots it is given, so the scheduler does not know which core or weight format is behind it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from textgen.cpu_share import CoreShare
from textgen.engine.chunk_pacing import ChunkPacer
from textgen.engine.constraints import GrammarCompiler, MaskTimer, apply_token_masks
from textgen.engine.core import CoreOptions, ModelCore, build_core, release_source_weights, sequence_positions
from textgen.engine.core.decoder import DecodeCore, StepOutput
from textgen.engine.core.fused import FusedKernels, load_fused_kernels
from textgen.engine.pooling import l2_normalise
from textgen.engine.prefix_cache import PrefixCache, PrefixHit
from textgen.engine.prefix_index import PrefixIndexStats
from textgen.engine.sampling import (
    RowLogprobs,
    TokenPenalties,
    prompt_token_logprobs,
    select_next_tokens,
    suppress_tokens,
)
from textgen.engine.sequence import SequenceState, tokenize_prompt
from textgen.engine.service_rate import ServiceRate, completions_needed, predicted_wait_s
from textgen.engine.speculation import Drafter, SequenceDrafts
from textgen.engine.types import (
    EmbeddingHandle,
    EmbeddingRequest,
    EmbeddingResult,
    EngineLimits,
    EngineStats,
    GenerationRequest,
    GenerationResult,
    Handle,
    LogprobAlternative,
    Priority,
    PromptLogprob,
    RequestTimings,
    SamplingParams,
    to_client_error,
)
from textgen.errors import (
    DeadlineExceededError,
    EngineError,
    GenerationCancelledError,
    InvalidRequestError,
    NotReadyError,
    PromptTooLongError,
    QueueFullError,
    TextGenError,
)
from textgen.loader import LoadedModel
from textgen.threads import run_in_own_thread

logger = logging.getLogger(__name__)

# One event for the event loop: (handle, text delta, final result, error).
Event = tuple[Handle | EmbeddingHandle, str, GenerationResult | EmbeddingResult | None, BaseException | None]


@dataclass(eq=False)  # compared by identity: its vectors are tensors
class _EmbeddingJob:
    """An embedding request on the inference thread: its inputs are prefilled in order, a few per step,
    and it finishes when the last one's vector is in."""

    handle: EmbeddingHandle
    vectors: list[torch.Tensor | None]
    next_input: int = 0  # the first input not yet taken into a step
    started_at: float | None = None

    @property
    def inputs(self) -> tuple[tuple[int, ...], ...]:
        return self.handle.request.inputs

    @property
    def pending(self) -> bool:
        return self.next_input < len(self.inputs)

    @property
    def complete(self) -> bool:
        return all(vector is not None for vector in self.vectors)

    def result(self) -> EmbeddingResult:
        now, request = time.monotonic(), self.handle.request
        started = self.started_at if self.started_at is not None else now
        vectors = [v for v in self.vectors if v is not None]
        return EmbeddingResult(
            vectors=torch.stack(vectors),
            prompt_tokens=request.total_tokens,
            timings=RequestTimings(
                queue_s=started - request.arrived_at, time_to_first_token_s=None, total_s=now - request.arrived_at
            ),
        )


# A prefill-only input taken into a step: (its request, the input's index).
EmbeddingPiece = tuple[_EmbeddingJob, int]


@dataclass(frozen=True)
class _PromptPiece:
    """Tokens [start, end) of a sequence's history (its prompt; for a preempted sequence that resumes, its
    prompt and the text generated so far) taken into a step; the last piece samples the next token,
    earlier ones (chunked prefill) only fill the slot."""

    seq: SequenceState
    start: int
    end: int
    chunked: bool = False  # a piece of a prompt prefilled in several (paced beside decoding streams)

    @property
    def final(self) -> bool:
        return self.end == len(self.seq.prompt_ids) + len(self.seq.generated)

    @property
    def tokens(self) -> list[int]:
        return self.seq.history[self.start : self.end]


NO_VECTORS = torch.empty((0, 0))
# Embedding tokens a decoding step may carry until the costs behind the share are measured.
EMBEDDING_PROBE_TOKENS = 16.0

SHUTTING_DOWN = "The server is shutting down; retry the request."
# Finished answers whose blocks wait for an idle moment to be prefilled and named (where decode steps write
# other bits than a prefill, ``_keep_generated_blocks``); the oldest is dropped past this many. They go in
# chunks of ANSWER_CHUNK_TOKENS (whole blocks, one at least), what a request arriving meanwhile may wait for.
PENDING_ANSWERS = 16
ANSWER_CHUNK_TOKENS = 64
# While streams decode, a long prompt's chunks add about CHUNK_STEP_SHARE to the decode steps' time on
# average (streams keep ~1 / (1 + share) of their rate during its prefill: the floor is 0.7). Each
# chunk is sized to about CHUNK_COST of a decode step, never below MIN_CHUNK_TOKENS, and chunks skip steps
# until the measured cost of the earlier ones is paid (engine/chunk_pacing.py).
CHUNK_STEP_SHARE = 0.25
CHUNK_COST = 0.6
MIN_CHUNK_TOKENS = 16


class BatchedEngine:
    name = "batched"

    def __init__(
        self,
        loaded: LoadedModel,
        limits: EngineLimits,
        *,
        core_options: CoreOptions | None = None,
        warmup: bool = True,
        owns_model: bool = False,
        cores: CoreShare | None = None,
    ) -> None:
        self._loaded = loaded
        # The process's cores, shared with its other engines (textgen.cpu_share): each step waits for its
        # turn and runs on a team sized to the free cores. None: steps run at once on torch's thread count.
        self._cores = cores
        self._turns = cores.join(loaded.name) if cores is not None else None
        self._owns_model = owns_model  # the only user of ``loaded``: its duplicate weights may be freed
        self._limits = limits
        self._core_options = core_options or CoreOptions(
            slots=limits.max_running + limits.embedding_slots,
            positions=sequence_positions(limits.max_prompt_tokens, limits.max_new_tokens_limit),
        )
        self._core: ModelCore | None = None
        self._kernels: FusedKernels | None = None  # fused.c, for sampling on the CPU (built with the core)
        # Speculative decoding (engine/speculation.py): drafts verified by the core's extend step, where it has one.
        self._drafter = Drafter(limits.speculation)
        self._extender: DecodeCore | None = None
        self._prefix: PrefixCache | None = None  # cached prompt prefixes (built with the core, where it keeps them)
        self._warmup = warmup
        self._lock = threading.Lock()
        self._work_available = threading.Condition(self._lock)
        self._waiting: dict[Priority, deque[Handle]] = {p: deque() for p in Priority}
        self._running_seqs: dict[int, SequenceState] = {}  # cache slot -> sequence
        self._backlog: deque[SequenceState] = deque()  # admitted (counted in _running), not yet prefilled
        # Finished answers (tenant, prompt and generated tokens) to prefill and name when idle.
        self._answers: deque[tuple[str | None, list[int]]] = deque(maxlen=PENDING_ANSWERS)
        self._running = 0
        # Embedding requests: submitted (under the lock), then owned by the inference thread.
        self._embeddings_waiting: deque[EmbeddingHandle] = deque()
        self._embeddings: deque[_EmbeddingJob] = deque()
        self._embeddings_skipped = False  # the last step left waiting inputs out: the next takes one first
        # While streams decode, embedding inputs are paced (``embedding_step_share``): each step earns
        # credit, in tokens, from the measured cost of a decode step and of one embedding token in it.
        self._embedding_credit = 0.0
        self._decode_step_s = 0.0  # recent decode-only step
        self._embedding_token_s = 0.0  # recent extra seconds per embedding token in a decoding step
        self._prompt_token_s = 0.0  # recent extra seconds per prompt token in a decoding step (chunk pacing)
        self._chunks = ChunkPacer(CHUNK_STEP_SHARE, CHUNK_COST, MIN_CHUNK_TOKENS, limits.prefill_chunk_tokens)
        self._clock: Callable[[], float] = time.perf_counter  # times steps (tests inject a fake one)
        self._interactive_streak = 0
        self._shared_rng = torch.Generator().manual_seed(int(time.time_ns() % 2**63))
        self._tokens_per_s = 0.0
        self._preemptions = 0  # sequences preempted for KV blocks since start (a counter)
        self._mean_budget = float(limits.default_new_tokens)
        # Completions per second (slots freed), measured for Retry-After (textgen.engine.service_rate).
        self.service_rate = ServiceRate()
        self._accepting = False
        self._ready = False
        self._stop_requested = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._step_observer: Callable[[int, float], None] | None = None
        # Structured output: compiles constraints for this tokenizer (GenerationService uses it
        # before submitting); mask_timer adds up the per-step cost of the token masks.
        self._model_vocabulary = _vocab_size(loaded)
        self.grammars = GrammarCompiler(loaded.tokenizer, loaded.eos_token_ids, self._model_vocabulary)
        self.mask_timer = MaskTimer()

    # ----- event-loop side -------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self._core is None:
            self._core = await run_in_own_thread(self._build_core, "textgen-core")
        self._thread = threading.Thread(target=self._serve_forever, name="textgen-engine", daemon=True)
        self._thread.start()
        self._accepting = True
        if self._warmup:
            await self._warm_up()
        self._ready = True

    def _build_core(self) -> ModelCore:
        """Off the event loop: build the core, then free the model weights it duplicates (when owned)."""
        core = build_core(self._loaded, self._core_options)
        options = self._core_options
        if options.fused and self._loaded.device.type == "cpu":
            self._kernels = load_fused_kernels()  # the core's build, loaded once
        if self._owns_model:
            release_source_weights(self._loaded, core)
        self._extender = core if isinstance(core, DecodeCore) else None
        self._log_speculation()
        if self._limits.prefix_cache and core.prefix_block_size > 0:
            self._prefix = PrefixCache(core, shared=self._limits.prefix_cache_shared)
        return core

    def _log_speculation(self) -> None:
        settings = self._drafter.settings
        if not self._drafter.enabled:
            logger.info("Speculative decoding: off (TEXTGEN_SPECULATIVE=%s)", settings.mode.value)
        elif self._extender is None:
            logger.info("Speculative decoding: off (the transformers core cannot score several tokens per sequence)")
        else:
            logger.info(
                "Speculative decoding: %s (n-gram drafts of up to %d tokens%s)",
                settings.mode.value,
                settings.max_draft,
                f", while at most {settings.max_batch} sequences run" if settings.mode.value == "auto" else "",
            )

    async def _warm_up(self) -> None:
        """One short batched generation so the first user request does not pay one-time costs.

        Warm-up requests skip the queue limits (a server configured with one slot must still start),
        and a warm-up the limits reject (a prompt limit of one token) is only logged.
        """
        started = time.perf_counter()
        params = SamplingParams(max_new_tokens=4, temperature=0.0)
        handles = [self._enqueue(GenerationRequest(prompt=p, params=params)) for p in ("Hi", "Hello")]
        outcomes = await asyncio.gather(*(h.result() for h in handles), return_exceptions=True)
        failures = [o for o in outcomes if isinstance(o, BaseException)]
        for failure in failures:
            if not isinstance(failure, TextGenError):
                raise failure
        if failures:
            logger.warning("Warm-up skipped: %s", failures[0])
        else:
            logger.info("Engine warmed up in %.2fs", time.perf_counter() - started)

    @property
    def ready(self) -> bool:
        return self._ready and self._accepting and self._thread is not None and self._thread.is_alive()

    def set_step_observer(self, observer: Callable[[int, float], None]) -> None:
        self._step_observer = observer

    def submit(self, request: GenerationRequest) -> Handle:
        if not self._accepting or self._loop is None:
            raise NotReadyError()
        with self._lock:
            if request.priority is Priority.INTERACTIVE and self._queue_full_locked():
                raise QueueFullError(retry_after_s=self._retry_after_locked())
        return self._enqueue(request)

    def submit_embedding(self, request: EmbeddingRequest) -> EmbeddingHandle:
        """Queue prefill-only work; its inputs share the next steps' prefill budget with prompts."""
        if not self._accepting or self._loop is None:
            raise NotReadyError()
        self._check_embedding_inputs(request)
        with self._lock:
            queued = len(self._embeddings_waiting) + len(self._embeddings)
            if queued >= self._limits.max_waiting + self._limits.embedding_slots:
                raise QueueFullError(retry_after_s=self._retry_after_locked())
            handle = EmbeddingHandle(request, self._loop)
            self._embeddings_waiting.append(handle)
            self._work_available.notify()
        return handle

    def _check_embedding_inputs(self, request: EmbeddingRequest) -> None:
        """What would fail a whole step: no input, an empty one, one past a slot, a token id outside the
        model's embedding table (the service checks the same first, with the request's own names)."""
        capacity, vocab = self._require_core().capacity, _vocab_size(self._loaded)
        if not request.inputs or not all(request.inputs):
            raise InvalidRequestError("An embedding request needs at least one input, and no input may be empty.")
        for tokens in request.inputs:
            if len(tokens) > capacity:
                raise PromptTooLongError(f"An input has {len(tokens)} tokens; at most {capacity} fit.")
            if min(tokens) < 0 or (vocab is not None and max(tokens) >= vocab):
                raise InvalidRequestError(f"Token ids must be between 0 and {(vocab or 1) - 1}.")

    def _enqueue(self, request: GenerationRequest) -> Handle:
        assert self._loop is not None
        handle = Handle(request, self._loop)
        with self._lock:
            self._waiting[request.priority].append(handle)
            self._work_available.notify()
        return handle

    async def stop(self, grace_s: float) -> None:
        """Stop admitting; let in-flight requests finish for up to grace_s; cancel the rest."""
        self._accepting = False
        self._ready = False
        deadline = time.monotonic() + grace_s
        # The inference thread owns the counts; polling them is simpler than a cross-thread event.
        while self._has_work() and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        with self._lock:
            self._stop_requested = True
            self._work_available.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        self.grammars.close()  # its compile threads and sandbox process
        await asyncio.sleep(0)  # let the final deliveries run

    @property
    def core(self) -> ModelCore:
        """The model core (built by start())."""
        return self._require_core()

    def core_info(self) -> dict[str, object]:
        return {} if self._core is None else self._core.describe()

    def stats(self) -> EngineStats:
        prefix = self.prefix_stats()
        with self._lock:
            return EngineStats(
                running=self._running,
                waiting_interactive=len(self._waiting[Priority.INTERACTIVE]),
                waiting_background=len(self._waiting[Priority.BACKGROUND]),
                tokens_per_s=self._tokens_per_s,
                draft_tokens=self._drafter.drafted,
                accepted_draft_tokens=self._drafter.accepted,
                prefix_query_tokens=None if prefix is None else prefix.query_tokens,
                prefix_hit_tokens=0 if prefix is None else prefix.hit_tokens,
                kv_blocks_total=self._core.total_blocks if self._core is not None else 0,
                kv_blocks_used=self._core.total_blocks - self._core.free_blocks if self._core is not None else 0,
                preemptions=self._preemptions,
            )

    def prefix_stats(self) -> PrefixIndexStats | None:
        """The prefix cache's counters (read without the inference thread's lock: plain integers), None
        where there is no prefix cache."""
        return None if self._prefix is None else self._prefix.stats()

    def _has_work(self) -> bool:
        with self._lock:
            return (
                self._running > 0
                or any(self._waiting.values())
                or bool(self._embeddings_waiting)
                or bool(self._embeddings)
            )

    def _queue_full_locked(self) -> bool:
        free_slots = max(0, self._limits.max_running - self._running)
        return len(self._waiting[Priority.INTERACTIVE]) >= self._limits.max_waiting + free_slots

    def _retry_after_locked(self) -> float:
        """Seconds until a request refused now could start: the completions it needs (everyone waiting
        ahead, then a slot) at the measured completion rate; before enough completions were measured,
        at the rate token throughput and the mean output budget suggest."""
        free_slots = max(0, self._limits.max_running - self._running)
        needed = completions_needed(len(self._waiting[Priority.INTERACTIVE]), free_slots)
        fallback = self._tokens_per_s / self._mean_budget if self._tokens_per_s > 0 and self._mean_budget > 0 else None
        return predicted_wait_s(needed, self.service_rate.completions_per_s(), fallback)

    def _deliver(self, events: Sequence[Event]) -> None:
        for handle, delta, result, error in events:
            if isinstance(handle, EmbeddingHandle):
                handle.finish(result if isinstance(result, EmbeddingResult) else None, error)
                continue
            if delta:
                handle.publish(delta)
            if result is not None or error is not None:
                handle.finish(result if isinstance(result, GenerationResult) else None, error)

    # ----- inference-thread side ---------------------------------------------------------------

    def _serve_forever(self) -> None:
        # Sampling edits the model's output logits in place; they are inference tensors.
        with torch.inference_mode():
            self._loop_until_stopped()
        self._flush(self._fail_everything())

    def _loop_until_stopped(self) -> None:
        while True:
            events: list[Event] = []
            try:
                if not self._wait_for_work(events):
                    break
                self._iterate_in_turn(events)
            except Exception:
                logger.exception("Engine step failed; failing the sequences in this batch")
                self._fail_batch(events, EngineError())
            finally:
                self._flush(events)

    def _wait_for_work(self, events: list[Event]) -> bool:
        """Block while idle, until work or a stop is notified (no timed wake-ups: an idle engine, e.g. a
        second model nobody uses, takes no CPU). False once a stop was requested."""
        with self._lock:
            while (
                not self._stop_requested
                and not self._running_seqs
                and not self._backlog
                and not any(self._waiting.values())
                and not self._embeddings_waiting
                and not self._embeddings
                and not self._answers
            ):
                self.service_rate.observe(busy=False, saturated=False)
                self._work_available.wait()  # submit, submit_embedding and stop notify under this lock
            if self._stop_requested:
                return False
            self._drop_expired_waiting_locked(events)
        return True

    def _iterate_in_turn(self, events: list[Event]) -> None:
        if self._cores is None or self._turns is None:
            self._iterate(events)
            return
        with self._cores.turn(self._turns):
            self._iterate(events)

    def _iterate(self, events: list[Event]) -> None:
        """Admit (while the backlog holds nothing not yet started, so later arrivals keep their priority;
        a prompt part-way through a chunked prefill does not hold admission up), retire, then one
        forward pass that decodes every running sequence and prefills the backlog's next prompts."""
        if all(seq.slot is not None for seq in self._backlog):  # empty, or only prompts part-way prefilled
            self._backlog.extend(self._admit(self._take_admissions(), events))
        else:
            self._admit_interactive_ahead(events)
        self._retire(events)
        self._make_room()
        admitted = self._next_prefill(events)
        pieces = self._next_embeddings(admitted, events)
        if self._running_seqs or admitted or pieces:
            self._step(admitted, events, decode=bool(self._running_seqs), pieces=pieces)
        elif self._answers and self._idle():
            self._prefill_answer()
        self._retire(events)

    def _idle(self) -> bool:
        """Nothing runs, waits or is prefilled (the answers' own work aside)."""
        with self._lock:
            waiting = any(self._waiting.values()) or bool(self._embeddings_waiting)
        return not (waiting or self._running_seqs or self._backlog or self._embeddings)

    def _prefill_answer(self) -> None:
        """One chunk of the oldest pending answer's blocks, prefilled and named, while nothing else runs: a
        request arriving meanwhile waits for this one chunk at most, then goes first."""
        assert self._prefix is not None
        tenant, tokens = self._answers[0]
        chunk = min(ANSWER_CHUNK_TOKENS, self._limits.prefill_chunk_tokens)
        try:
            more = self._prefix.prefill_named(tenant, tokens, chunk)
        except Exception:  # nobody waits on it; only the answer is not kept
            logger.exception("Prefilling a finished answer's blocks for the prefix cache failed")
            more = False
        if not more:
            self._answers.popleft()

    def _admit_interactive_ahead(self, events: list[Event]) -> None:
        """Background prompts in the backlog that wait (for KV blocks, or preempted) do not hold interactive
        requests back: those are admitted and go before them, where they may preempt running background
        sequences for blocks (``_preempt_background_for``)."""
        waiting = [index for index, seq in enumerate(self._backlog) if seq.slot is None]
        if any(self._backlog[i].handle.request.priority is Priority.INTERACTIVE for i in waiting):
            return  # an interactive prompt waits already; the next ones are admitted behind it, in arrival order
        with self._lock:
            if not self._waiting[Priority.INTERACTIVE]:
                return
        for offset, seq in enumerate(self._admit(self._take_admissions(interactive_only=True), events)):
            self._backlog.insert(waiting[0] + offset, seq)

    def _make_room(self) -> None:
        """Preempt until the running sequences' next positions fit in the KV cache's free blocks: the
        newest background sequence first, an interactive one only when no background one runs. A preempted
        sequence gives its blocks back and goes to the front of the backlog; when blocks allow, its prompt
        and the text generated so far are prefilled again and it continues where it stopped."""
        core = self._require_core()
        while self._running_seqs and core.blocks_needed(list(self._running_seqs), []) > core.free_blocks:
            if len(self._running_seqs) == 1:
                return  # alone it always fits (the pool holds one full-context sequence); the step says if not
            self._preempt(self._preemption_victim(), 0)

    def _preempt(self, slot: int, backlog_at: int) -> None:
        """The running sequence in ``slot`` gives its blocks back and waits in the backlog at ``backlog_at``;
        its prefill (prompt and text so far) starts over when blocks allow."""
        core = self._require_core()
        seq = self._running_seqs.pop(slot)
        self._keep_generated_blocks(seq)
        core.free([slot])
        seq.slot, seq.prefilled, seq.prefix_looked_up = None, 0, False  # its prefill starts over
        self._backlog.insert(backlog_at, seq)
        self._preemptions += 1
        logger.info(
            "KV cache full: preempted a %s sequence of %d positions (%d free blocks of %d); it resumes when "
            "blocks free up",
            seq.handle.request.priority.name.lower(),
            len(seq.history),
            core.free_blocks,
            core.total_blocks,
            extra={"request_id": seq.handle.request.request_id},
        )

    def _preempt_background_for(self, seq: SequenceState, blocks: int, taken_blocks: int, index: int) -> bool:
        """An interactive prompt (at ``index`` of the backlog) that needs ``blocks`` beside what this step took
        already does not wait for background sequences to finish: the newest running background sequences are
        preempted until it fits (they resume after it, in the backlog behind it). Nothing is preempted unless
        all of them together free enough. Returns whether it fits now."""
        if seq.handle.request.priority is not Priority.INTERACTIVE:
            return False
        core = self._require_core()
        background = sorted(
            (item for item in self._running_seqs.items() if item[1].handle.request.priority is Priority.BACKGROUND),
            key=lambda item: item[1].handle.request.arrived_at,
        )

        def shortfall() -> int:
            running = list(self._running_seqs)
            return blocks + taken_blocks + core.blocks_needed(running, []) + len(running) - core.free_blocks

        # what preempting all of them could free, at most (a prefix shared with another sequence stays held)
        held = sum(core.blocks_needed([], [len(s.history)]) + 1 for _, s in background)
        if not background or shortfall() > held:
            return False
        while background and shortfall() > 0:
            slot, _ = background.pop()  # the newest first
            self._preempt(slot, index + 1)
        return shortfall() <= 0

    def _preemption_victim(self) -> int:
        """The slot of the newest background sequence (by arrival: a resumed sequence keeps its age), else of
        the newest sequence."""
        running = self._running_seqs.items()
        background = [(slot, seq) for slot, seq in running if seq.handle.request.priority == Priority.BACKGROUND]
        slot, _ = max(background or running, key=lambda item: item[1].handle.request.arrived_at)
        return slot

    def _next_prefill(self, events: list[Event]) -> list[_PromptPiece]:
        """The backlog's next prompts, in arrival order, up to ``prefill_step_tokens`` (at least one) and
        to ``max_prefill_tokens`` as rows x longest prompt (the padded cost on the transformers core), while
        the KV cache has blocks for them beside the running sequences' next positions (the first one waits
        for blocks unless nothing runs). A preempted sequence's "prompt" is its prompt and the text
        generated so far.

        A prompt starts after its cached prefix (the prefix cache). On a core that can continue a slot, a
        prompt longer than ``prefill_chunk_tokens`` is cut into chunks of that size while others decode, one
        per step (chunked prefill), so running streams keep moving during a long prefill; with nothing
        decoding a prompt goes whole up to ``max_prefill_tokens``. Prompts cancelled or expired while they
        waited end here."""
        now = time.monotonic()
        taken: list[_PromptPiece] = []
        tokens = longest = 0  # of whole prompts (a chunk is paced by prefill_chunk_tokens instead)
        core = self._require_core()
        # A block of headroom per running sequence, so that what is admitted now does not force a preemption
        # (of itself, perhaps) within the next steps.
        headroom = len(self._running_seqs)
        running_need, taken_blocks = core.blocks_needed(list(self._running_seqs), []) + headroom, 0
        extends = core.extends
        limits = self._limits
        # The first prompt always goes: whole when it is the only work (up to max_prefill_tokens), else a chunk
        # when the chunks' pacing allows one (a prompt that fits in one goes whole regardless).
        first_cap = self._chunk_tokens() if self._running_seqs else self._idle_chunk_tokens()
        chunk_waits = bool(self._running_seqs) and not self._chunks.chunk_due
        index = 0
        while index < len(self._backlog):
            seq = self._backlog[index]
            if seq.handle.cancel_requested or _expired(seq.handle, now):
                del self._backlog[index]
                self._end_prefill(seq)
                self._release(1)
                events.append((seq.handle, "", None, _ending_error(seq.handle, now)))
                continue
            self._look_up_prefix(seq)
            start = seq.prefilled if seq.slot is not None else (seq.prefix_hit.tokens if seq.prefix_hit else 0)
            size = len(seq.prompt_ids) + len(seq.generated) - start
            chunked = not taken and extends and bool(self._running_seqs) and (size > first_cap or seq.slot is not None)
            if chunked and chunk_waits:
                self._give_back_prefix(seq)
                index += 1  # its next chunk waits for the pacing's credit; shorter prompts behind it may go
                continue
            if not taken:
                if extends:
                    size = min(size, first_cap)
            else:
                padded = (len(taken) + 1) * max(longest, size)
                if tokens + size > limits.prefill_step_tokens or padded > limits.max_prefill_tokens:
                    self._give_back_prefix(seq)
                    break
            if _prompt_logprobs_pending(seq):
                scoring = core.blocks_needed([], [len(seq.prompt_ids)])  # a scratch slot's, freed right after
                if scoring > core.free_blocks - running_need - taken_blocks and (taken or self._running_seqs):
                    if not self._preempt_background_for(seq, scoring, taken_blocks, index):
                        self._give_back_prefix(seq)
                        break  # it waits for blocks, as a prompt does
                    running_need = core.blocks_needed(list(self._running_seqs), []) + len(self._running_seqs)
                if not self._score_prompt(seq, index, events):
                    continue  # it ended (scored with nothing to generate, or scoring failed)
            # A fresh slot (after its cached prefix, block-aligned) takes exactly these; a chunk that
            # continues a slot may straddle one more block boundary.
            blocks = core.blocks_needed([], [size]) + (1 if seq.slot is not None else 0)
            # (read after the lookup: a cached prefix it holds now is no longer free)
            if blocks > core.free_blocks - running_need - taken_blocks and (taken or self._running_seqs):
                if not self._preempt_background_for(seq, blocks, taken_blocks, index):
                    self._give_back_prefix(seq)
                    break  # it waits for blocks: running sequences retire (or are preempted) first
                running_need = core.blocks_needed(list(self._running_seqs), []) + len(self._running_seqs)
            taken_blocks += blocks
            piece = _PromptPiece(seq, start, start + size, chunked)
            taken.append(piece)
            if piece.final:
                del self._backlog[index]
                tokens, longest = tokens + size, max(longest, size)
            else:
                # The rest of this prompt goes in the next steps, before the prompts behind it; short
                # prompts behind it may share this step (streams restarting during a long prefill).
                longest, index = max(longest, size), index + 1
        return taken

    def _look_up_prefix(self, seq: SequenceState) -> None:
        """Once per sequence, before its first piece: its cached prefix, held until copied in."""
        if self._prefix is None or seq.prefix_looked_up:
            return
        seq.prefix_looked_up = True
        try:
            hit = self._prefix.lookup(seq.handle.request.tenant, seq.history)
        except Exception:
            logger.exception("Prefix cache lookup failed; computing the prompt whole")
            return
        seq.prefix_hit = hit if hit.tokens else None

    def _give_back_prefix(self, seq: SequenceState) -> None:
        """A sequence not taken into this step stops holding its cached prefix (held blocks are not free:
        the running sequences' next positions must still fit); it is looked up again when its turn comes."""
        if self._prefix is None or seq.slot is not None or not seq.prefix_looked_up:
            return
        hit = seq.prefix_hit or PrefixHit([], 0)
        self._prefix.give_back(hit, len(seq.prompt_ids) + len(seq.generated))
        seq.prefix_hit, seq.prefix_looked_up = None, False

    def _end_prefill(self, seq: SequenceState) -> None:
        """A sequence leaves before its prefill finished: its held prefix and its slot go back."""
        if seq.prefix_hit is not None and self._prefix is not None:
            self._prefix.drop(seq.prefix_hit)
        seq.prefix_hit = None
        if seq.slot is not None:
            self._free_quietly([seq.slot])
            seq.slot = None

    def _next_embeddings(self, admitted: list[_PromptPiece], events: list[Event]) -> list[EmbeddingPiece]:
        """Embedding inputs for this step, in arrival order, one slot each.

        While streams decode, the inputs are paced so that they add about ``embedding_step_share`` to the
        decode steps' time: each step earns credit (that share of a decode step's measured time, in
        embedding tokens at their measured cost) and inputs go while the credit covers them; an input
        longer than a step's credit goes once the credit has saved up for it. With nothing decoding, they
        take what is left of ``prefill_step_tokens`` after the prompts (and of ``max_prefill_tokens`` as
        rows x longest input), at least one when no prompt is prefilled or the previous step left them
        all out. Requests cancelled or expired end here."""
        with self._lock:
            arrived = list(self._embeddings_waiting)
            self._embeddings_waiting.clear()
        self._embeddings.extend(_EmbeddingJob(handle, [None] * len(handle.request.inputs)) for handle in arrived)
        self._drop_ended_embeddings(events)
        if not self._embeddings:
            self._embedding_credit = 0.0
            return []
        limits = self._limits
        core = self._require_core()
        room = core.free_slots - sum(1 for piece in admitted if piece.seq.slot is None)
        block_room = core.free_blocks - core.blocks_needed(
            list(self._running_seqs), [piece.end - piece.start for piece in admitted]
        )
        decoding = bool(self._running_seqs)
        if decoding:
            head = self._embeddings[0]
            cap = max(float(limits.prefill_step_tokens), float(len(head.inputs[head.next_input])))
            self._embedding_credit = min(cap, self._embedding_credit + self._embedding_tokens_per_step())
            budget, first_goes = self._embedding_credit, False
        else:
            budget = limits.prefill_step_tokens - sum(piece.end - piece.start for piece in admitted)
            first_goes = not admitted or self._embeddings_skipped
        taken: list[EmbeddingPiece] = []
        tokens = longest = 0
        for job in self._embeddings:
            while job.pending and len(taken) < room:
                size = len(job.inputs[job.next_input])
                padded = (len(taken) + 1) * max(longest, size)
                blocks = core.blocks_needed([], [size])
                if blocks > block_room:
                    break  # the KV cache is full: inputs wait for blocks (theirs are freed after each step)
                block_room -= blocks
                fits = tokens + size <= budget and padded <= limits.max_prefill_tokens
                if not fits and (taken or not first_goes):
                    break
                if job.started_at is None:
                    job.started_at = time.monotonic()
                taken.append((job, job.next_input))
                job.next_input += 1
                tokens, longest = tokens + size, max(longest, size)
            if job.pending:
                break  # inputs go in arrival order: a later request never passes an earlier one
        if decoding:
            self._embedding_credit -= tokens
        self._embeddings_skipped = not taken and any(job.pending for job in self._embeddings)
        return taken

    def _embedding_tokens_per_step(self) -> float:
        """The credit one decoding step earns: ``embedding_step_share`` of a decode step, in embedding tokens."""
        if self._decode_step_s <= 0 or self._embedding_token_s <= 0:
            return EMBEDDING_PROBE_TOKENS
        return self._limits.embedding_step_share * self._decode_step_s / self._embedding_token_s

    def _measure_prompt_tokens(self, elapsed: float, tokens: int) -> None:
        """What a prompt token adds to a decoding step (for the size of chunks beside streams)."""
        if self._decode_step_s <= 0 or tokens <= 0:
            return
        per_token = max(elapsed - self._decode_step_s, 0.0) / tokens
        per_token = max(per_token, self._decode_step_s / (4 * self._limits.prefill_step_tokens))  # noise floor
        self._prompt_token_s = per_token if self._prompt_token_s <= 0 else 0.8 * self._prompt_token_s + 0.2 * per_token

    def _idle_chunk_tokens(self) -> int:
        """With nothing decoding, the first prompt goes whole when it is the only work; when other prompts wait
        behind it (streams between two requests, all restarting at once), or it is part-way already, it goes on
        in ``prefill_chunk_tokens`` chunks, so the others start decoding after one chunk instead of after the
        whole long prompt (and pacing takes over from there)."""
        with self._lock:
            queued = any(self._waiting.values())
        head = self._backlog[0] if self._backlog else None
        if queued or len(self._backlog) > 1 or (head is not None and head.slot is not None):
            return min(self._limits.prefill_chunk_tokens, self._limits.max_prefill_tokens)
        return self._limits.max_prefill_tokens

    def _chunk_tokens(self) -> int:
        """A chunk's size while streams decode: what adds about ``CHUNK_COST`` of a decode step's time
        (measured), between ``MIN_CHUNK_TOKENS`` and ``prefill_chunk_tokens`` (that until measured)."""
        return self._chunks.chunk_tokens(self._decode_step_s, self._prompt_token_s)

    def _measure_step(self, elapsed: float, rows: int, prompts: int, embedding_tokens: int) -> None:
        """Keep the costs the embedding pacing needs: a decode-only step, and what an embedding token adds."""
        if not rows or prompts:
            return
        if not embedding_tokens:
            self._decode_step_s = elapsed if self._decode_step_s <= 0 else 0.8 * self._decode_step_s + 0.2 * elapsed
        elif self._decode_step_s > 0:
            per_token = max(elapsed - self._decode_step_s, 0.0) / embedding_tokens
            # A noisy step can measure nearly nothing; assume at least that 4 x prefill_step_tokens embedding
            # tokens cost a decode step (a prefill costs far more), so one lucky step cannot open the gates.
            per_token = max(per_token, self._decode_step_s / (4 * self._limits.prefill_step_tokens))
            self._embedding_token_s = (
                per_token if self._embedding_token_s <= 0 else 0.8 * self._embedding_token_s + 0.2 * per_token
            )

    def _drop_ended_embeddings(self, events: list[Event]) -> None:
        now = time.monotonic()
        for job in [j for j in self._embeddings if j.handle.cancel_requested or j.handle.request.expired(now)]:
            self._embeddings.remove(job)
            ending = GenerationCancelledError() if job.handle.cancel_requested else DeadlineExceededError()
            events.append((job.handle, "", None, ending))

    def _store_embeddings(self, pieces: list[EmbeddingPiece], pooled: torch.Tensor, events: list[Event]) -> None:
        """Each input's normalised vector into its request; finished requests answer."""
        for (job, index), vector in zip(pieces, l2_normalise(pooled), strict=True):
            job.vectors[index] = vector
        for job in {id(job): job for job, _ in pieces}.values():
            if job.complete and job in self._embeddings:
                self._embeddings.remove(job)
                events.append((job.handle, "", job.result(), None))

    def _fail_embeddings(self, pieces: list[EmbeddingPiece], events: list[Event], error: TextGenError) -> None:
        for job in {id(job): job for job, _ in pieces}.values():
            if job in self._embeddings:
                self._embeddings.remove(job)
                events.append((job.handle, "", None, error))

    def _flush(self, events: list[Event]) -> None:
        if events and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._deliver, list(events))

    def _drop_expired_waiting_locked(self, events: list[Event]) -> None:
        now = time.monotonic()
        for queue in self._waiting.values():
            for handle in [h for h in queue if h.cancel_requested or _expired(h, now)]:
                queue.remove(handle)
                events.append((handle, "", None, _ending_error(handle, now)))

    def _take_admissions(self, *, interactive_only: bool = False) -> list[Handle]:
        """Pop as many waiting requests as there are free slots, interactive first (or only).

        Every ``background_share`` interactive admissions, a waiting background job goes first, so
        background work keeps moving under steady interactive load.
        """
        taken: list[Handle] = []
        with self._lock:
            free = self._limits.max_running - self._running
            interactive, background = self._waiting[Priority.INTERACTIVE], self._waiting[Priority.BACKGROUND]
            if interactive_only:
                background = deque()
            while free > len(taken) and (interactive or background):
                background_turn = self._interactive_streak >= self._limits.background_share
                if background and (background_turn or not interactive):
                    taken.append(background.popleft())
                    self._interactive_streak = 0
                else:
                    taken.append(interactive.popleft())
                    self._interactive_streak += 1
            self._running += len(taken)
            saturated = self._running >= self._limits.max_running or any(self._waiting.values())
            self.service_rate.observe(busy=True, saturated=saturated)
        return taken

    def _admit(self, handles: list[Handle], events: list[Event]) -> list[SequenceState]:
        """Tokenize the admitted requests; returns them as sequences, in arrival order."""
        prepared: list[tuple[Handle, list[int], int]] = []
        for handle in handles:
            try:
                ids, budget = tokenize_prompt(
                    self._loaded.tokenizer,
                    handle.request,
                    self._limits,
                    self._require_core().capacity,
                    self._model_vocabulary,
                )
            except Exception as error:
                if not isinstance(error, TextGenError):
                    logger.exception("Tokenizing a prompt failed", extra={"request_id": handle.request.request_id})
                self._release(1)
                events.append((handle, "", None, to_client_error(error)))
                continue
            prepared.append((handle, ids, budget))
            self._mean_budget = 0.9 * self._mean_budget + 0.1 * budget
        return self._sequences(prepared, events)

    def _score_prompt(self, seq: SequenceState, index: int, events: list[Event]) -> bool:
        """echo with logprobs, when the backlog's turn and the KV blocks for a scratch pass over the prompt have
        come (at admission a full pool failed the request). A request with nothing to generate (scoring only)
        ends here, as does one whose scoring fails; returns whether the sequence goes on to its prefill."""
        alternatives = seq.handle.request.params.prompt_logprobs
        assert alternatives is not None
        try:
            seq.handle.prompt_logprobs = self._prompt_logprobs(seq.prompt_ids, alternatives)
        except Exception as error:
            if not isinstance(error, TextGenError):
                logger.exception("Scoring a prompt failed", extra={"request_id": seq.handle.request.request_id})
            ending: tuple[GenerationResult | None, BaseException | None] = (None, to_client_error(error))
        else:
            if seq.budget > 0:
                return True
            ending = (seq.result(), None)
        del self._backlog[index]
        self._end_prefill(seq)
        self._release(1)
        events.append((seq.handle, "", *ending))
        return False

    def _prompt_logprobs(self, ids: list[int], alternatives: int) -> list[PromptLogprob]:
        """echo with logprobs: one extra forward pass over the prompt (only for requests that ask), in a
        scratch cache slot (one is free: admitted requests hold no slot until their prefill)."""
        tokenizer = self._loaded.tokenizer

        def text(token_id: int) -> str:
            return str(tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False))

        entries = [PromptLogprob(ids[0], text(ids[0]), None)]
        scored = prompt_token_logprobs(self._require_core().score(ids), ids, alternatives) if len(ids) > 1 else []
        for token_id, (logprob, top) in zip(ids[1:], scored, strict=True):
            kept = tuple(LogprobAlternative(t, text(t), value) for t, value in top if value != float("-inf"))
            entries.append(PromptLogprob(token_id, text(token_id), logprob, kept))
        return entries

    def _sequences(self, chunk: list[tuple[Handle, list[int], int]], events: list[Event]) -> list[SequenceState]:
        """Admitted requests as sequences; one with nothing to generate finishes at once."""
        loaded = self._loaded
        seqs = [
            SequenceState.admit(handle, ids, budget, loaded.tokenizer, loaded.eos_token_ids)
            for handle, ids, budget in chunk
        ]
        for seq in seqs:
            if seq.budget == 0 and not _prompt_logprobs_pending(seq):
                self._release(1)
                events.append((seq.handle, "", seq.result(), None))
        return [s for s in seqs if s.budget > 0 or _prompt_logprobs_pending(s)]

    def _step(
        self,
        admitted: list[_PromptPiece],
        events: list[Event],
        *,
        decode: bool,
        pieces: list[EmbeddingPiece] | None = None,
    ) -> None:
        """One forward pass: the next token of every running sequence (when ``decode``), a piece of every
        admitted prompt (the first new token where the piece ends the prompt), and the pooled vector of
        every embedding input in ``pieces`` (prefilled into scratch slots freed right after). A failure here
        fails only the admitted sequences and the embedding requests in the step when nothing was decoding;
        otherwise the loop fails the whole batch."""
        core = self._require_core()
        pieces = pieces or []
        started = self._clock()
        # A sequence part-way through its prompt holds a slot but does not decode yet.
        decode_slots = [slot for slot in core.slots_in_order() if slot in self._running_seqs] if decode else []
        rows = [self._running_seqs[slot] for slot in decode_slots]
        tokens = torch.tensor([seq.generated[-1] for seq in rows], dtype=torch.long)
        drafts = None if admitted or pieces else self._drafts_for(rows)
        if drafts is not None and not self._drafts_fit(decode_slots, drafts):
            drafts = None
        pool_slots: list[int] = []
        try:
            prefill_slots = [self._slot_for(piece.seq) for piece in admitted]
            pool_slots = [core.allocate() for _ in pieces]
            prompts = [piece.tokens for piece in admitted]  # of history: a preempted sequence resumes too
            if drafts is not None:  # a verification step: each row's token and its draft
                assert self._extender is not None
                inputs = [[seq.generated[-1], *draft] for seq, draft in zip(rows, drafts, strict=True)]
                output = self._extender.extend(decode_slots, inputs, scored=[len(i) for i in inputs])
            elif pieces:
                pool_prompts = [job.inputs[index] for job, index in pieces]
                output = core.step_pooled(decode_slots, tokens, prefill_slots, prompts, pool_slots, pool_prompts)
            else:  # generation alone: the plain step
                output = StepOutput(core.step(decode_slots, tokens, prefill_slots, prompts), NO_VECTORS)
        except Exception:
            self._free_quietly(pool_slots[::-1])
            for piece in admitted:
                self._end_prefill(piece.seq)
                if piece.seq in self._backlog:
                    self._backlog.remove(piece.seq)
            self._release(len(admitted))
            events.extend((piece.seq.handle, "", None, EngineError()) for piece in admitted)
            self._fail_embeddings(pieces, events, EngineError())
            if decode_slots:
                raise  # the loop fails the running batch too
            logger.exception("Prefill failed for %d requests and %d embedding inputs", len(admitted), len(pieces))
            return
        # The scratch slots are the newest rows: freed last first, no cached row has to move.
        self._free_quietly(pool_slots[::-1])
        finished = self._finish_pieces(admitted)
        emitted = len(rows)
        if drafts is not None:
            emitted = self._verify_into(rows, drafts, decode_slots, output.logits, events)
        else:
            logits = output.logits
            if len(finished) != len(admitted):  # chunks that do not end their prompt sample nothing
                keep = list(range(len(rows))) + [len(rows) + i for i, piece in enumerate(admitted) if piece.final]
                logits = logits.index_select(0, torch.tensor(keep, dtype=torch.long))
            if rows or finished:
                self._sample_into(rows + finished, logits, events)
        if pieces:
            self._store_embeddings(pieces, output.pooled, events)
        embedding_tokens = sum(len(job.inputs[index]) for job, index in pieces)
        elapsed = self._clock() - started
        prompt_tokens = sum(p.end - p.start for p in admitted)
        if rows:  # before the decode step's cost moves: the credit is in decode steps of the time being
            chunk_tokens = sum(p.end - p.start for p in admitted if p.chunked)
            self._chunks.observe(self._decode_step_s, elapsed, prompt_tokens, chunk_tokens)
        self._measure_step(elapsed, len(rows), len(admitted), embedding_tokens)
        if rows and admitted and not pieces:
            self._measure_prompt_tokens(elapsed, prompt_tokens)
        if rows:
            self._tokens_per_s = 0.8 * self._tokens_per_s + 0.2 * (emitted / max(elapsed, 1e-6))
            if self._step_observer is not None:
                self._step_observer(len(rows), elapsed)

    def _drafts_for(self, rows: list[SequenceState]) -> list[list[int]] | None:
        """Each decoding row's draft for a verification step, or None for a plain step (speculation off, a
        core without an extend step, or no row with a draft). A row drafts no more than its budget leaves
        after the token the step yields anyway, nor past its cache; the step carries no more tokens than keep
        every product in the one-token format (``DecodeCore.uniform_rows``), so logits, and greedy text, are
        the same as without drafts."""
        extender = self._extender
        if extender is None or not self._drafter.applies(len(rows)):
            return None
        states = []
        for seq in rows:
            if seq.speculation is None:
                seq.speculation = SequenceDrafts()
            states.append(seq.speculation)
        capacity = extender.capacity
        rooms = [
            min(seq.budget - len(seq.generated) - 1, capacity - len(seq.prompt_ids) - len(seq.generated))
            for seq in rows
        ]
        histories = [(seq.prompt_ids, seq.generated) for seq in rows]
        drafts = self._drafter.drafts(states, histories, rooms, extender.uniform_rows - len(rows))
        return drafts if any(drafts) else None

    def _drafts_fit(self, slots: list[int], drafts: list[list[int]]) -> bool:
        """Drafted positions take KV blocks too: verify only when every row's token and draft fit in the free
        blocks (otherwise a plain step; preemption makes room for one token per row, not for drafts)."""
        extender = self._extender
        assert extender is not None
        needed = sum(extender.cache.blocks_to_add(slot, 1 + len(d)) for slot, d in zip(slots, drafts, strict=True))
        return needed <= extender.free_blocks

    def _verify_into(
        self,
        rows: list[SequenceState],
        drafts: list[list[int]],
        slots: list[int],
        logits: torch.Tensor,
        events: list[Event],
    ) -> int:
        """Position by position, each row's token is chosen exactly as a plain step would choose it (the same
        sampling path and random numbers, masks and penalties following the tokens kept so far); while it
        equals the row's draft the next position follows. For a drafted token that is the standard rejection
        rule with a point-mass draft (engine/speculation.py). The cache is then cut back past the positions
        not kept. Returns the tokens emitted."""
        starts, at = [], 0
        for draft in drafts:
            starts.append(at)
            at += 1 + len(draft)
        kept = [0] * len(rows)
        active, position = list(range(len(rows))), 0
        while active:
            index = torch.tensor([starts[r] + position for r in active], dtype=torch.long)
            chosen = self._sample_into([rows[r] for r in active], logits.index_select(0, index), events)
            following = []
            for r, token in zip(active, chosen, strict=True):
                if position < len(drafts[r]) and token == drafts[r][position] and not rows[r].finished:
                    kept[r] += 1
                    following.append(r)
            active, position = following, position + 1
        assert self._extender is not None
        for seq, slot, draft, count in zip(rows, slots, drafts, kept, strict=True):
            if seq.speculation is not None:
                self._drafter.record(seq.speculation, len(draft), count)
            if not seq.finished and count < len(draft):
                self._extender.truncate(slot, len(seq.prompt_ids) + len(seq.generated) - 1)
        return len(rows) + sum(kept)

    def _slot_for(self, seq: SequenceState) -> int:
        """The sequence's cache slot: its own after an earlier chunk, else a fresh one holding its cached
        prefix (copied in)."""
        if seq.slot is not None:
            return seq.slot
        core = self._require_core()
        seq.slot = core.allocate()
        hit, seq.prefix_hit = seq.prefix_hit, None
        if hit is not None and self._prefix is not None:
            self._prefix.load(seq.slot, hit)
            seq.prefilled = hit.tokens
            if not seq.generated:  # what the caller is told: its prompt's first prefill, not a resumption
                seq.cached_tokens = hit.tokens
        return seq.slot

    def _finish_pieces(self, admitted: list[_PromptPiece]) -> list[SequenceState]:
        """After the pass: each piece's tokens are in its slot; prompts now complete start decoding and
        their full blocks go into the prefix cache. Returns those sequences, in the step's order."""
        finished = []
        for piece in admitted:
            seq = piece.seq
            assert seq.slot is not None
            seq.prefilled = piece.end
            if not piece.final:
                continue
            self._running_seqs[seq.slot] = seq
            finished.append(seq)
            if self._prefix is not None:
                try:
                    self._prefix.publish(seq.handle.request.tenant, seq.slot, seq.history)
                except Exception:  # the request is fine; only its prefix is not kept
                    logger.exception("Keeping a prompt's blocks in the prefix cache failed")
        return finished

    def _keep_generated_blocks(self, seq: SequenceState, *, later: bool = False) -> None:
        """A sequence leaving its slot (finished, ended, preempted) names its full blocks past the prompt
        too, where the core's decode steps write what a prefill would (``decode_kv_is_prefill_kv``): a
        chat's next turn resends the answer, and a preempted sequence resumes from its own blocks, without
        computing them again. Elsewhere decode-written blocks are never named (outputs stay the same with
        the cache on and off); with ``later`` (a finished answer) its blocks are prefilled and named when the
        engine is idle instead (``_prefill_answer``)."""
        if self._prefix is None or seq.slot is None or not seq.generated:
            return
        if not self._require_core().decode_kv_is_prefill_kv:
            block = self._prefix.block_size
            if later and len(seq.history) // block > len(seq.prompt_ids) // block:
                self._answers.append((seq.handle.request.tenant, seq.history))
            return
        try:
            self._prefix.publish(seq.handle.request.tenant, seq.slot, seq.history)
        except Exception:  # the request is fine; only its blocks are not kept
            logger.exception("Keeping a sequence's generated blocks in the prefix cache failed")

    def _sample_into(self, rows: list[SequenceState], logits: torch.Tensor, events: list[Event]) -> list[int]:
        logits = apply_token_masks(logits, [s.constraint for s in rows], self.mask_timer)
        params = [s.handle.request.params for s in rows]
        vocabulary = logits.shape[-1]
        penalties = [_penalties(s, vocabulary) if p.counts_tokens else None for s, p in zip(rows, params, strict=True)]
        unended = [row for row, seq in enumerate(rows) if seq.min_tokens and seq.eos_ids and seq.ends_suppressed]
        if unended:
            logits = suppress_tokens(logits, unended, sorted(self._loaded.eos_token_ids))
        logprobs: list[RowLogprobs] = [None] * len(rows)
        tokens = select_next_tokens(
            logits,
            params,
            [s.history if p.repetition_penalty != 1.0 else [] for s, p in zip(rows, params, strict=True)],
            [s.generator for s in rows],
            self._shared_rng,
            logprobs_out=logprobs,
            kernels=self._kernels,
            penalties=penalties,
        )
        chosen: list[int] = tokens.tolist()
        for seq, token, row_logprobs in zip(rows, chosen, logprobs, strict=True):
            delta = seq.accept(token, row_logprobs)
            if delta:
                events.append((seq.handle, delta, None, None))
        return chosen

    def _retire(self, events: list[Event]) -> None:
        if not self._running_seqs:
            return
        now = time.monotonic()
        gone: list[int] = []
        for slot, seq in self._running_seqs.items():
            if seq.finished:
                events.append((seq.handle, "", seq.result(), None))
            elif seq.handle.cancel_requested or _expired(seq.handle, now):
                events.append((seq.handle, "", None, _ending_error(seq.handle, now)))
            else:
                continue
            gone.append(slot)
        if not gone:
            return
        for slot in gone:
            seq = self._running_seqs.pop(slot)
            self._keep_generated_blocks(seq, later=seq.finished)
        self._release(len(gone))
        self._require_core().free(gone)

    def _require_core(self) -> ModelCore:
        if self._core is None:
            raise EngineError("The engine has no model core (start() was not awaited).")
        return self._core

    def _free_quietly(self, slots: list[int]) -> None:
        if self._core is None or not slots:
            return
        try:
            self._core.free(slots)
        except Exception:
            logger.exception("Freeing %d cache slots failed", len(slots))

    def _release(self, count: int) -> None:
        with self._lock:
            self._running -= count
        self.service_rate.finished(count)

    def _fail_batch(self, events: list[Event], error: TextGenError) -> None:
        if self._running_seqs:
            events.extend((seq.handle, "", None, error) for seq in self._running_seqs.values())
            self._release(len(self._running_seqs))
            self._free_quietly(list(self._running_seqs))
            self._running_seqs.clear()

    def _fail_everything(self) -> list[Event]:
        """At stop: whatever is still waiting or running gets a shutdown error."""
        events: list[Event] = []
        self._answers.clear()
        self._fail_batch(events, NotReadyError(SHUTTING_DOWN))
        events.extend((seq.handle, "", None, NotReadyError(SHUTTING_DOWN)) for seq in self._backlog)
        for seq in self._backlog:
            self._end_prefill(seq)
        self._release(len(self._backlog))
        self._backlog.clear()
        events.extend((job.handle, "", None, NotReadyError(SHUTTING_DOWN)) for job in self._embeddings)
        self._embeddings.clear()
        with self._lock:
            for queue in self._waiting.values():
                events.extend((h, "", None, NotReadyError(SHUTTING_DOWN)) for h in queue)
                queue.clear()
            events.extend((h, "", None, NotReadyError(SHUTTING_DOWN)) for h in self._embeddings_waiting)
            self._embeddings_waiting.clear()
        return events


def _prompt_logprobs_pending(seq: SequenceState) -> bool:
    """echo with logprobs asked and not computed yet (once: a preempted sequence keeps them)."""
    return seq.handle.request.params.prompt_logprobs is not None and seq.handle.prompt_logprobs is None


def _penalties(seq: SequenceState, vocabulary: int) -> TokenPenalties:
    """The row's presence/frequency penalties, made (none yet) at its first sampling step."""
    if seq.penalties is None:
        seq.penalties = TokenPenalties(vocabulary, seq.handle.request.params)
    return seq.penalties


def _vocab_size(loaded: LoadedModel) -> int | None:
    """Rows of the model's output layer (may exceed the tokenizer's vocabulary)."""
    size = getattr(loaded.model.config, "vocab_size", None)
    return size if isinstance(size, int) else None


def _expired(handle: Handle, now: float) -> bool:
    return handle.request.expired(now)


def _ending_error(handle: Handle, now: float) -> TextGenError:
    if handle.cancel_requested:
        return GenerationCancelledError()
    if _expired(handle, now):
        return DeadlineExceededError()
    return EngineError()
