"""The original design, kept as the measured baseline: one ``pipeline()`` call per request.

Each request runs a full ``generate`` in a ``ThreadPoolExecutor`` worker via ``run_in_executor``.
Threads contend for the same cores and never share a forward pass, which is exactly what the
``batched`` engine improves on. Seeds are best effort here: every thread draws from torch's one
global generator, so a seeded request is only reproducible when nothing else is running.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from transformers import (
    PythonBackend,
    StoppingCriteria,
    StoppingCriteriaList,
    TextGenerationPipeline,
    TokenizersBackend,
    pipeline,
)

from textgen.engine.pooling import l2_normalise, transformers_pooled
from textgen.engine.sequence import SequenceState, tokenize_prompt
from textgen.engine.service_rate import ServiceRate, completions_needed, predicted_wait_s
from textgen.engine.types import (
    EmbeddingHandle,
    EmbeddingRequest,
    EmbeddingResult,
    EngineLimits,
    EngineStats,
    GenerationRequest,
    GenerationResult,
    Handle,
    RequestTimings,
    SamplingParams,
    to_client_error,
)
from textgen.errors import (
    DeadlineExceededError,
    GenerationCancelledError,
    InvalidRequestError,
    NotReadyError,
    PromptTooLongError,
    QueueFullError,
)
from textgen.loader import LoadedModel

logger = logging.getLogger(__name__)


class _HandleStreamer:
    """A transformers streamer that feeds each new token to the request's SequenceState."""

    def __init__(self, seq: SequenceState, loop: asyncio.AbstractEventLoop) -> None:
        self._seq = seq
        self._loop = loop
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() first hands over the prompt itself
            self._prompt_seen = True
            return
        for token in value.flatten().tolist():
            if self._seq.finished:
                return
            delta = self._seq.accept(int(token))
            if delta:
                self._loop.call_soon_threadsafe(self._seq.handle.publish, delta)

    def end(self) -> None:
        return None


class _StopWhenDone(StoppingCriteria):
    """Stops generate() once the sequence hit a stop string, was cancelled or passed its deadline."""

    def __init__(self, seq: SequenceState) -> None:
        self._seq = seq

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: object) -> torch.Tensor:
        handle = self._seq.handle
        done = self._seq.finished or handle.cancel_requested or _expired(handle)
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


def _expired(handle: Handle | EmbeddingHandle) -> bool:
    return handle.request.expired()


def _generate_kwargs(params: SamplingParams, budget: int) -> dict[str, object]:
    kwargs: dict[str, object] = {"max_new_tokens": budget, "do_sample": not params.greedy}
    if not params.greedy:
        kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
        if params.min_p > 0.0:
            kwargs["min_p"] = params.min_p
    if params.repetition_penalty != 1.0:
        kwargs["repetition_penalty"] = params.repetition_penalty
    if params.logit_bias:
        kwargs["sequence_bias"] = {(token_id,): bias for token_id, bias in params.logit_bias}
    if params.ignore_eos:
        kwargs["min_new_tokens"] = budget
    elif params.min_tokens:
        kwargs["min_new_tokens"] = min(params.min_tokens, budget)
    return kwargs


def refuse_unsupported(params: SamplingParams) -> None:
    """What generate() here cannot do: a 400 naming the field, before anything is queued."""
    if params.counts_tokens:
        field = "presence_penalty" if params.presence_penalty else "frequency_penalty"
        raise InvalidRequestError(
            f"{field}: presence and frequency penalties need the batched engine (TEXTGEN_ENGINE=batched); "
            "this server runs the threadpool engine."
        )
    if params.prompt_logprobs is not None:
        raise InvalidRequestError(
            "echo: the prompt's log-probabilities need the batched engine (TEXTGEN_ENGINE=batched); "
            "this server runs the threadpool engine."
        )


class ThreadPoolEngine:
    name = "threadpool"

    def __init__(self, loaded: LoadedModel, limits: EngineLimits, *, workers: int, warmup: bool = True) -> None:
        self._loaded = loaded
        self._limits = limits
        self._workers = workers
        self._warmup = warmup
        self._executor: ThreadPoolExecutor | None = None
        self._pipe: TextGenerationPipeline | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._in_flight: set[asyncio.Task[None]] = set()
        self._handles: set[Handle | EmbeddingHandle] = set()
        self.service_rate = ServiceRate()  # completions per second, for Retry-After
        self._seed_lock = threading.Lock()
        self._accepting = False
        self._ready = False
        self._tokens = 0
        self._started_at = time.monotonic()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="textgen-pipeline")
        tokenizer = self._loaded.tokenizer
        if not isinstance(tokenizer, PythonBackend | TokenizersBackend):  # what the pipeline accepts
            raise TypeError(f"the text-generation pipeline cannot use a {type(tokenizer).__name__} tokenizer")
        self._pipe = pipeline("text-generation", model=self._loaded.model, tokenizer=tokenizer)
        self._accepting = True
        if self._warmup:
            warm = self.submit(GenerationRequest("Hello", SamplingParams(max_new_tokens=4, temperature=0.0)))
            await warm.result()
        self._ready = True

    @property
    def ready(self) -> bool:
        return self._ready and self._accepting

    def submit(self, request: GenerationRequest) -> Handle:
        if not self._accepting or self._loop is None:
            raise NotReadyError()
        refuse_unsupported(request.params)
        if len(self._handles) >= self._workers + self._limits.max_waiting:
            raise QueueFullError(retry_after_s=self._retry_after())
        handle = Handle(request, self._loop)
        self._handles.add(handle)
        self._observe_load()
        task = self._loop.create_task(self._run(handle))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)
        return handle

    def submit_embedding(self, request: EmbeddingRequest) -> EmbeddingHandle:
        """Prefill-only work, simply: the inputs in padded forward passes of their own on a worker thread
        (``max_prefill_tokens`` padded tokens each), pooled and normalised as the batched engine does."""
        if not self._accepting or self._loop is None:
            raise NotReadyError()
        self._check_embedding_inputs(request)
        if len(self._handles) >= self._workers + self._limits.max_waiting:
            raise QueueFullError(retry_after_s=self._retry_after())
        handle = EmbeddingHandle(request, self._loop)
        self._handles.add(handle)
        task = self._loop.create_task(self._run_embedding(handle))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)
        return handle

    def _check_embedding_inputs(self, request: EmbeddingRequest) -> None:
        limit = self._loaded.context_length
        vocab = getattr(self._loaded.model.config, "vocab_size", None)
        if not request.inputs or not all(request.inputs):
            raise InvalidRequestError("An embedding request needs at least one input, and no input may be empty.")
        for tokens in request.inputs:
            if limit is not None and len(tokens) > limit:
                raise PromptTooLongError(f"An input has {len(tokens)} tokens; at most {limit} fit.")
            if min(tokens) < 0 or (isinstance(vocab, int) and max(tokens) >= vocab):
                raise InvalidRequestError(f"Token ids must be between 0 and {(vocab or 1) - 1}.")

    async def _run_embedding(self, handle: EmbeddingHandle) -> None:
        assert self._loop is not None and self._executor is not None
        try:
            handle.finish(await self._loop.run_in_executor(self._executor, self._embed, handle))
        except Exception as error:
            if not isinstance(error, (GenerationCancelledError, DeadlineExceededError)):
                logger.exception("Embedding failed", extra={"request_id": handle.request.request_id})
            handle.finish(None, to_client_error(error))
        finally:
            self._handles.discard(handle)

    def _embed(self, handle: EmbeddingHandle) -> EmbeddingResult:
        """Runs on a worker thread: the inputs in groups of at most ``max_prefill_tokens`` padded tokens."""
        request, started = handle.request, time.monotonic()
        pad_id = int(self._loaded.tokenizer.pad_token_id or 0)
        vectors = []
        group: list[tuple[int, ...]] = []
        for tokens in [*request.inputs, ()]:  # the empty sentinel flushes the last group
            longest = max([len(tokens), *(len(t) for t in group)])
            if group and (not tokens or (len(group) + 1) * longest > self._limits.max_prefill_tokens):
                self._raise_if_ended(handle)
                vectors.append(transformers_pooled(self._loaded.model, group, pad_id))
                group = []
            if tokens:
                group.append(tokens)
        now = time.monotonic()
        return EmbeddingResult(
            vectors=l2_normalise(torch.cat(vectors)),
            prompt_tokens=request.total_tokens,
            timings=RequestTimings(
                queue_s=started - request.arrived_at, time_to_first_token_s=None, total_s=now - request.arrived_at
            ),
        )

    async def stop(self, grace_s: float) -> None:
        self._accepting = False
        self._ready = False
        if self._in_flight:
            await asyncio.wait(set(self._in_flight), timeout=grace_s)
        for handle in list(self._handles):
            handle.cancel()
        if self._in_flight:
            await asyncio.wait(set(self._in_flight))
        if self._executor is not None:
            await asyncio.to_thread(self._executor.shutdown, True)

    def set_step_observer(self, observer: Callable[[int, float], None]) -> None:
        """No shared decode steps here: each thread runs its own generate() loop."""

    def core_info(self) -> dict[str, object]:
        return {"core": "transformers-generate", "weights": str(self._loaded.dtype).removeprefix("torch.")}

    def stats(self) -> EngineStats:
        running = min(len(self._handles), self._workers)
        elapsed = max(time.monotonic() - self._started_at, 1e-6)
        return EngineStats(
            running=running,
            waiting_interactive=len(self._handles) - running,
            waiting_background=0,
            tokens_per_s=self._tokens / elapsed,
        )

    def _retry_after(self) -> float:
        """The completions a request refused now needs (everyone waiting ahead, then a worker), at the
        measured completion rate (``textgen.engine.service_rate``)."""
        waiting = max(0, len(self._handles) - self._workers)
        needed = completions_needed(waiting, max(0, self._workers - len(self._handles)))
        return predicted_wait_s(needed, self.service_rate.completions_per_s())

    def _observe_load(self) -> None:
        self.service_rate.observe(busy=bool(self._handles), saturated=len(self._handles) >= self._workers)

    async def _run(self, handle: Handle) -> None:
        assert self._loop is not None and self._executor is not None
        try:
            result = await self._loop.run_in_executor(self._executor, self._generate, handle)
            handle.finish(result)
        except Exception as error:
            if not isinstance(error, (GenerationCancelledError, DeadlineExceededError)):
                logger.exception("Generation failed", extra={"request_id": handle.request.request_id})
            handle.finish(None, to_client_error(error))
        finally:
            self._handles.discard(handle)
            self.service_rate.finished()
            self._observe_load()

    def _generate(self, handle: Handle) -> GenerationResult:
        """Runs on a worker thread: one full pipeline() call for one request."""
        assert self._loop is not None and self._pipe is not None
        self._raise_if_ended(handle)
        loaded = self._loaded
        ids, budget = tokenize_prompt(loaded.tokenizer, handle.request, self._limits, loaded.context_length)
        seq = SequenceState.admit(handle, ids, budget, loaded.tokenizer, loaded.eos_token_ids)
        if budget > 0:
            kwargs = _generate_kwargs(handle.request.params, budget)
            kwargs.update(
                streamer=_HandleStreamer(seq, self._loop),
                stopping_criteria=StoppingCriteriaList([_StopWhenDone(seq)]),
                return_full_text=False,
                pad_token_id=loaded.tokenizer.pad_token_id,
            )
            self._call_pipeline(handle.request, kwargs)
        self._raise_if_ended(handle)
        if not seq.finished:
            delta = seq.close()
            if delta:
                self._loop.call_soon_threadsafe(handle.publish, delta)
        self._tokens += len(seq.generated)
        return seq.result()

    def _call_pipeline(self, request: GenerationRequest, kwargs: dict[str, object]) -> None:
        with torch.inference_mode():
            if request.params.seed is None:
                self._run_generate(request, kwargs)
                return
            with self._seed_lock:
                torch.manual_seed(request.params.seed)
                self._run_generate(request, kwargs)

    def _run_generate(self, request: GenerationRequest, kwargs: dict[str, object]) -> None:
        """The pipeline for a text prompt; generate() on the ids themselves for a token-id prompt."""
        assert self._pipe is not None
        if request.prompt_ids is None:
            self._pipe(request.prompt, **kwargs)
            return
        model = self._loaded.model
        ids = torch.tensor([list(request.prompt_ids)], dtype=torch.long, device=model.device)
        kwargs = {key: value for key, value in kwargs.items() if key != "return_full_text"}
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)  # type: ignore[operator]

    @staticmethod
    def _raise_if_ended(handle: Handle | EmbeddingHandle) -> None:
        if handle.cancel_requested:
            raise GenerationCancelledError()
        if _expired(handle):
            raise DeadlineExceededError()
