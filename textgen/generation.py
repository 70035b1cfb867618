"""What every way into the engine shares: content checks, submission, metrics, results, streaming.

The sync and streaming routes, the OpenAI-compatible routes and the job runner all go through this
one ``GenerationService``, so a rule such as "filter prompts and outputs" has exactly one home.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import statistics
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from textgen.config import Settings
from textgen.content_filter import ContentFilter, StreamingFilter
from textgen.engine.constraints import CompiledGrammar, Constraint, GrammarCompiler
from textgen.engine.service_rate import RETRY_AFTER_MAX_S, RETRY_AFTER_MIN_S
from textgen.engine.text import IncrementalDetokenizer
from textgen.engine.types import (
    Engine,
    EngineLimits,
    FinishReason,
    GenerationRequest,
    GenerationResult,
    Handle,
    LogprobAlternative,
    LogprobEntry,
    Priority,
    SamplingParams,
    prompt_token_limit,
)
from textgen.errors import (
    ContentRejectedError,
    InvalidRequestError,
    PromptTooLongError,
    QueueFullError,
    RateLimitedError,
)
from textgen.metrics import Metrics
from textgen.ratelimit import NoRateLimit, RateLimiter, Reservation, budget_refusal
from textgen.threads import RequestThreads

if TYPE_CHECKING:
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

PROMPT_REJECTED = "The prompt was rejected by the content filter."
OUTPUT_REJECTED = "The generated text was withheld by the content filter."
COMPILING_PHASE = "compiling its constraint"
# Stream lifetimes the stream cap's Retry-After is predicted from (StreamSlots).
RECENT_STREAMS = 64
# The content-filter metric's action for a structured row that ended at a match (finish_reason content_filter).
STRUCTURED_FILTER_ACTION = "content_filter"

# Work that could kill the process (compiling a new constraint) is announced through this marker when
# one is set: the job runner sets it for the task running a job, and records the phase in the job
# store while the work runs, so a job whose processing killed a process is failed, not retried.
RiskyPhase = Callable[[str], AbstractAsyncContextManager[None]]
risky_phase: ContextVar[RiskyPhase | None] = ContextVar("textgen_risky_phase", default=None)

# A prompt longer than this many characters per token of the limit is refused without tokenizing it:
# ordinary text averages 3-5 characters per token, and this bound stays generous for long tokens (runs
# of spaces in code), while a 1 MB prompt is refused before a tokenizer or filter pass over it.
MAX_CHARS_PER_TOKEN = 32


def prompt_fingerprint(prompt: str) -> str:
    """Length and short hash: enough to correlate log lines without logging user text."""
    digest = hashlib.sha256(prompt.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"len={len(prompt)} sha256={digest}"


@dataclass(frozen=True)
class TextRequest:
    """A native generation request as the service takes it (``textgen.services.requests.text_request``
    makes it from the validated request). ``open_ended``: the caller named no output length, so the
    default is an upper bound the token budget may lower."""

    prompt: str
    params: SamplingParams
    timeout_s: float | None = None
    open_ended: bool = False


@dataclass(frozen=True)
class ResultTimings:
    queue_s: float
    time_to_first_token_s: float | None
    total_s: float


@dataclass(frozen=True)
class ResultTopLogprob:
    token: str
    token_id: int
    logprob: float


@dataclass(frozen=True)
class ResultTokenLogprob:
    token: str
    token_id: int
    logprob: float
    top_logprobs: list[ResultTopLogprob]


@dataclass(frozen=True)
class TextResult:
    """A finished native generation, filtered: what ``/generate`` answers and a job records. Its fields
    (``dataclasses.asdict``) are the stored job result and the response body's fields."""

    generated_text: str
    model: str
    request_id: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    timings: ResultTimings
    token_logprobs: list[ResultTokenLogprob] | None = None
    cached_tokens: int = 0  # prompt tokens served from the prefix cache

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def result_logprobs(entries: Sequence[LogprobEntry]) -> list[ResultTokenLogprob]:
    return [
        ResultTokenLogprob(
            token=e.token,
            token_id=e.token_id,
            logprob=e.logprob,
            top_logprobs=[ResultTopLogprob(token=t.token, token_id=t.token_id, logprob=t.logprob) for t in e.top],
        )
        for e in entries
    ]


def tokens_used(handle: Handle, outcome: GenerationResult | BaseException) -> int:
    """Tokens a finished request generated (its prompt is accounted for by the reservation). Without a
    result (cancelled, disconnected, failed, past its deadline) the engine reports no count, so the text
    produced so far stands in for it, one token per character: more than the real count for ordinary
    text, and never more than the request's budget."""
    if isinstance(outcome, GenerationResult):
        return outcome.completion_tokens
    budget = handle.request.params.token_budget(0, EngineLimits.default_new_tokens, 1 << 30)
    return min(budget, len(handle.text_so_far))


class StreamSlot:
    """One caller's open stream; freed when the stream it is attached to ends, or at once when the
    ``with`` block it was taken in is left without attaching one (an error before the stream began)."""

    def __init__(self, release: Callable[[], None]) -> None:
        self._release = release
        self._attached = False

    def release(self) -> None:
        self._release()

    def attach(self, events: AsyncIterator[Any]) -> AsyncIterator[Any]:
        self._attached = True

        async def counted() -> AsyncIterator[Any]:
            try:
                async for item in events:
                    yield item
            finally:
                self._release()

        stream = counted()
        weakref.finalize(stream, self._release)  # a stream dropped before it started still frees its slot
        return stream

    def __enter__(self) -> StreamSlot:
        return self

    def __exit__(self, kind: object, error: object, traceback: object) -> None:
        if kind is not None or not self._attached:
            self._release()


class StreamSlots:
    """Open streams per caller (rate-limit key) in this process; 429 past ``per_caller`` (0 = no cap).

    The 429's Retry-After predicts when the first of the caller's open streams ends, from the real state:
    each open stream's age and the lifetimes of the streams that ended recently (any caller's, the last
    ``RECENT_STREAMS``). A stream of age ``a`` is expected to last the median lifetime of the recent streams
    that lived longer than ``a``; when none did (or none has ended yet), as long again as it has so far.
    The clock is injected so tests drive it."""

    def __init__(self, per_caller: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_caller = per_caller
        self._clock = clock
        self._opened: dict[str, list[float]] = {}  # when each open stream of a caller began
        self._lifetimes: deque[float] = deque(maxlen=RECENT_STREAMS)

    def open_count(self, key: str) -> int:
        return len(self._opened.get(key, ()))

    @property
    def total(self) -> int:
        """Open streams of every caller (the drain waits for them to send their final event)."""
        return sum(len(opened) for opened in self._opened.values())

    def retry_after_s(self, key: str) -> float:
        """Seconds until one of ``key``'s open streams is expected to end (clamped; the header rounds up)."""
        now = self._clock()
        ages = [now - began for began in self._opened.get(key, ())]
        if not ages:
            return RETRY_AFTER_MIN_S
        return min(RETRY_AFTER_MAX_S, max(RETRY_AFTER_MIN_S, min(self._expected_remaining(age) for age in ages)))

    def _expected_remaining(self, age: float) -> float:
        longer = sorted(lifetime for lifetime in self._lifetimes if lifetime > age)
        if not longer:
            return age
        return statistics.median(longer) - age

    def take(self, key: str) -> StreamSlot:
        """A slot for one more open stream of ``key``; RateLimitedError when it has ``per_caller`` open."""
        if self.per_caller and self.open_count(key) >= self.per_caller:
            raise RateLimitedError(
                f"Too many open streams: this caller already has {self.per_caller} open "
                "(TEXTGEN_MAX_STREAMS_PER_CALLER); close one, or retry after the time in the Retry-After header "
                "(when the first of them is expected to end).",
                retry_after_s=self.retry_after_s(key),
            )
        began = self._clock()
        self._opened.setdefault(key, []).append(began)
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            self._lifetimes.append(self._clock() - began)
            opened = self._opened.get(key, [])
            if began in opened:
                opened.remove(began)
            if not opened:
                self._opened.pop(key, None)

        return StreamSlot(release)


@dataclass(frozen=True)
class TokenGrant:
    """What a request may spend: its reservation (prompt + output tokens) and, for a request that named
    no output limit, the limit it was granted (None: the request runs as asked)."""

    reservation: Reservation | None
    max_new_tokens: int | None = None


# A request that names no output limit is granted what the window can give, but at least this many
# tokens (or what one whole window allows, if that is less); below it, it waits for the next window.
MIN_OPEN_ENDED_GRANT = EngineLimits.default_new_tokens
# Tries at granting an open-ended request what the window has left, when others take it meanwhile.
GRANT_TRIES = 3


@dataclass
class GenerationService:
    engine: Engine
    content_filter: ContentFilter
    settings: Settings
    model_name: str
    metrics: Metrics
    rate_limiter: RateLimiter = field(default_factory=NoRateLimit)
    # Counts a prompt's tokens as the engine will (None: only the character bound is checked, and no
    # prompt tokens are charged to TPM).
    tokenizer: PreTrainedTokenizerBase | None = None
    context_length: int | None = None
    threads: RequestThreads = field(default_factory=RequestThreads, repr=False)
    _refunds: set[asyncio.Task[None]] = field(default_factory=set, init=False, repr=False)

    def close(self) -> None:
        self.threads.close()

    @property
    def prompt_token_limit(self) -> int:
        """The most prompt tokens a request may have (the engine checks the same limit again)."""
        settings = self.settings
        return prompt_token_limit(settings.max_prompt_tokens, settings.max_new_tokens_limit, self.context_length)

    async def check_prompt(self, prompt: str, request_id: str) -> None:
        """400 for a prompt that is too long, checked before any other work on it (characters at once,
        then tokens), then the content filter; the token count and the filter run off the event loop."""
        await self.check_prompts([prompt], request_id)

    async def check_prompts(self, prompts: Sequence[str], request_id: str) -> None:
        """``check_prompt`` for several prompts: every prompt's size before any prompt's tokens or content."""
        for prompt in prompts:
            logger.info("Prompt received (%s)", prompt_fingerprint(prompt), extra={"request_id": request_id})
            logger.debug("Prompt text: %r", prompt, extra={"request_id": request_id})
            self._check_characters(len(prompt))

        def screen_all() -> None:
            for prompt in prompts:
                self._screen(prompt, [prompt], request_id, filter_now=False)
            for prompt in prompts:
                self._screen(prompt, [prompt], request_id, count_now=False)

        await self.threads.run(screen_all)

    async def check_chat(self, contents: Sequence[str], render: Callable[[], str], request_id: str) -> str:
        """The chat prompt ``render()`` builds from messages with ``contents``, checked as ``check_prompt``
        checks a prompt (each message's content goes through the filter); rendering runs off the loop too."""
        logger.info(
            "Chat received (%d messages, %d characters)",
            len(contents),
            sum(len(content) for content in contents),
            extra={"request_id": request_id},
        )
        self._check_characters(sum(len(content) for content in contents))

        def render_and_screen() -> str:
            prompt = render()
            self._check_characters(len(prompt))
            self._screen(prompt, contents, request_id)
            return prompt

        return await self.threads.run(render_and_screen)

    def _check_characters(self, characters: int) -> None:
        limit = self.prompt_token_limit
        if characters > limit * MAX_CHARS_PER_TOKEN:
            raise PromptTooLongError(
                f"The prompt has {characters} characters, more than {limit * MAX_CHARS_PER_TOKEN} "
                f"({MAX_CHARS_PER_TOKEN} per token); this server accepts at most {limit} tokens "
                "(TEXTGEN_MAX_PROMPT_TOKENS and the model's context length). Shorten the prompt."
            )

    def _screen(
        self, prompt: str, filtered: Sequence[str], request_id: str, *, count_now: bool = True, filter_now: bool = True
    ) -> None:
        """In a worker thread: the prompt's token count, then the filter over each of ``filtered``."""
        if count_now and self.tokenizer is not None:
            tokens = self._count_tokens(prompt)
            limit = self.prompt_token_limit
            if tokens > limit:
                raise PromptTooLongError(
                    f"The prompt has {tokens} tokens; this server accepts at most {limit} "
                    "(TEXTGEN_MAX_PROMPT_TOKENS and the model's context length). Shorten the prompt."
                )
        if not filter_now:
            return
        matches = sum(len(self.content_filter.find(text)) for text in filtered)
        if matches:
            self.metrics.observe_filter("prompt", "reject")
            logger.warning(
                "Prompt rejected by the content filter (%d matches)", matches, extra={"request_id": request_id}
            )
            raise ContentRejectedError(PROMPT_REJECTED)

    def check_logprobs_budget(self, params: Sequence[SamplingParams], field_name: str) -> None:
        """400 naming ``field_name`` when the request's choices could return more log-probability entries
        (generated tokens × (1 + alternatives), summed over choices) than TEXTGEN_MAX_LOGPROBS_PER_REQUEST:
        each entry costs the response about 30-70 bytes of JSON, all built on the event loop."""
        asked = [p for p in params if p.logprobs is not None]
        if not asked:
            return
        entries = sum(self.token_budget(p) * (1 + (p.logprobs or 0)) for p in asked)
        limit = self.settings.max_logprobs_per_request
        if entries > limit:
            tokens, alternatives = self.token_budget(asked[0]), asked[0].logprobs
            raise InvalidRequestError(
                f"{field_name}: {len(asked)} choice(s) × {tokens} tokens × (1 + {alternatives} alternatives) = "
                f"{entries} log-probabilities, more than this server returns for one request ({limit}, "
                "TEXTGEN_MAX_LOGPROBS_PER_REQUEST); ask for fewer alternatives, fewer choices (n) or fewer tokens."
            )

    def _grammars(self, params: SamplingParams) -> GrammarCompiler | None:
        """The engine's constraint compiler; 400 when the request needs one the engine lacks."""
        grammars: GrammarCompiler | None = getattr(self.engine, "grammars", None)
        if grammars is None and (
            params.constraint is not None or params.logprobs is not None or params.prompt_logprobs is not None
        ):
            raise InvalidRequestError(
                "Structured output and logprobs need the batched engine (TEXTGEN_ENGINE=batched); "
                f"this server runs the {self.engine.name} engine."
            )
        return grammars

    async def prepare(self, params: SamplingParams) -> CompiledGrammar | None:
        """Check and compile the request's constraint before anything is queued (400 naming the problem).

        Compilation runs on a compile thread (neither the event loop nor the inference thread waits for
        it) and is cached, so the ``submit`` that follows finds it ready."""
        grammars = self._grammars(params)
        if grammars is None or params.constraint is None:
            return None
        return await self.compile_constraint(grammars, params.constraint)

    async def prepare_constraint(self, constraint: Constraint | None) -> CompiledGrammar | None:
        """``prepare`` for a constraint alone (batch lines, before their choices are submitted)."""
        return await self.prepare(SamplingParams(constraint=constraint))

    async def compile_constraint(self, grammars: GrammarCompiler, constraint: Constraint) -> CompiledGrammar:
        found = grammars.cached(constraint)
        if found is not None:
            return found
        mark = risky_phase.get()
        async with mark(COMPILING_PHASE) if mark is not None else contextlib.nullcontext():
            return await grammars.compile_async(constraint)

    async def prepare_request(self, request: TextRequest) -> None:
        await self.prepare(request.params)

    def submit(
        self,
        prompt: str,
        params: SamplingParams,
        request_id: str,
        priority: Priority,
        timeout_s: float | None = None,
        *,
        prompt_ids: tuple[int, ...] | None = None,
        tenant: str | None = None,
    ) -> Handle:
        """Queue a request whose constraint ``prepare`` compiled (it is never compiled here: this runs
        on the event loop). ``prompt_ids``: the prompt as token ids (``prompt`` is then their text).
        ``tenant``: whose request it is (the prefix cache matches only that tenant's cached prompts)."""
        grammars = self._grammars(params)
        grammar = None
        if grammars is not None and params.constraint is not None:
            grammar = grammars.cached(params.constraint)
            if grammar is None:
                # Only if more distinct constraints than the cache holds were compiled between this
                # request's prepare() and now.
                raise QueueFullError(
                    "The server is compiling many different constraints; retry this request.", retry_after_s=1
                )
        request = GenerationRequest(
            prompt=prompt,
            params=params,
            request_id=request_id,
            priority=priority,
            timeout_s=timeout_s or self.settings.request_timeout_s,
            grammar=grammar,
            prompt_ids=prompt_ids,
            tenant=tenant,
        )
        return self.engine.submit(request)

    def submit_request(
        self, request: TextRequest, request_id: str, priority: Priority, tenant: str | None = None
    ) -> Handle:
        return self.submit(request.prompt, request.params, request_id, priority, request.timeout_s, tenant=tenant)

    def visible_logprobs(self, entries: Sequence[LogprobEntry]) -> list[LogprobEntry]:
        """Log-probability entries with the content filter's redaction applied to each token's text."""
        return [_redacted_entry(entry, self.content_filter) for entry in entries]

    def filter_output(self, text: str, request_id: str) -> str:
        """The filtered text (redacted, or ContentRejectedError); runs the filter on the calling thread."""
        matches = self.content_filter.find(text)
        if not matches:
            return text
        self._report_output_match("Generated text", len(matches), self.settings.output_filter_action, request_id)
        return self.content_filter.redact(text)

    def _report_output_match(self, what: str, matches: int, label: str, request_id: str) -> None:
        """Count and log an output match once; ContentRejectedError when the action is ``reject``."""
        self.metrics.observe_filter("output", label)
        logger.warning(
            "%s matched the content filter (%d matches, action=%s)",
            what,
            matches,
            label,
            extra={"request_id": request_id},
        )
        if label == "reject":
            raise ContentRejectedError(OUTPUT_REJECTED)

    def _ended_at_match(self, result: GenerationResult, request_id: str) -> GenerationResult:
        """A structured row (tool calls, response_format, a grammar) whose text matched the filter: cut
        before the first match and finished with ``content_filter`` (what OpenAI answers), never redacted:
        "[redacted]" inside a JSON string can break its schema (maxLength, pattern, enum) and would be
        handed to a tool as if the model had written it. ``reject`` still refuses the whole answer."""
        matches = self.content_filter.find(result.text)
        if not matches:
            return self._visible(result)
        action = self.settings.output_filter_action
        label = "reject" if action == "reject" else STRUCTURED_FILTER_ACTION
        self._report_output_match("Structured output", len(matches), label, request_id)
        cut = result.text[: min(match.start for match in matches)]
        return dataclasses.replace(_with_text(result, cut), finish_reason=FinishReason.CONTENT_FILTER)

    def _visible(self, result: GenerationResult) -> GenerationResult:
        if not result.token_logprobs:
            return result
        return dataclasses.replace(result, token_logprobs=tuple(self.visible_logprobs(result.token_logprobs)))

    async def admit(self, principal: str) -> None:
        """Count a request against the caller's rate limit (429 when over it)."""
        await self.rate_limiter.acquire(principal)

    def token_budget(self, params: SamplingParams, prompt_tokens: int = 0) -> int:
        """The most tokens a request with ``params`` can generate (its output reservation)."""
        return params.token_budget(prompt_tokens, EngineLimits.default_new_tokens, self.settings.max_new_tokens_limit)

    async def count_prompt_tokens(self, prompts: Sequence[str]) -> int:
        """The prompts' tokens, as usage reports them (each prompt once), counted in a worker thread;
        0 when there is no token limit to charge them to."""
        if self.tokenizer is None or not prompts or self.rate_limiter.tokens_per_minute == 0:
            return 0
        return await self.threads.run(lambda: sum(self._count_tokens(prompt) for prompt in prompts))

    def _count_tokens(self, prompt: str) -> int:
        """A prompt's tokens exactly as the engine counts them (``engine.sequence.tokenize_prompt``)."""
        assert self.tokenizer is not None
        return len(self.tokenizer(prompt, add_special_tokens=True).input_ids)

    async def reserve(self, principal: str, tokens: int, *, prompt_tokens: int = 0) -> Reservation | None:
        """Reserve a request's whole token budget before it is submitted (429 when it does not fit)."""
        return await self.rate_limiter.reserve(principal, tokens, prompt_tokens=prompt_tokens)

    async def grant(
        self,
        principal: str,
        params: Sequence[SamplingParams],
        prompt_tokens: int = 0,
        *,
        open_ended: bool = False,
        flexible: bool = True,
        requests: int = 0,
        quiet: bool = False,
    ) -> TokenGrant:
        """Reserve ``prompt_tokens`` plus the output budget of every request in ``params`` for
        ``principal`` (and count ``requests`` requests with it). 429 when it does not fit now; the
        ``TokenBudgetTooLargeError`` kind when it never could.

        ``open_ended``: the request named no output limit, so its default (up to
        TEXTGEN_MAX_NEW_TOKENS_LIMIT for chat) is only an upper bound. It is granted at most what one
        whole window allows after the prompt and, when ``flexible``, what the current window has left
        (never less than ``MIN_OPEN_ENDED_GRANT``, or the whole window's share if that is smaller:
        below it, 429 until the window ends). Background work passes ``flexible=False`` so that the grant
        depends only on the request and the limit (a replayed idempotent job stores the same body).
        ``quiet``: refusals are logged at DEBUG (the batch coordinator retries and logs pacing itself)."""
        budgets = [self.token_budget(p, prompt_tokens) for p in params]
        tpm = self.rate_limiter.tokens_per_minute
        if not (open_ended and tpm and budgets):
            tokens = prompt_tokens + sum(budgets)
            reservation = await self.rate_limiter.reserve(
                principal, tokens, requests=requests, prompt_tokens=prompt_tokens, quiet=quiet
            )
            return TokenGrant(reservation)
        wanted, choices = max(budgets), len(budgets)
        room = (tpm - prompt_tokens) // choices  # each choice's share of a whole, empty window
        if room < 1:
            raise budget_refusal(prompt_tokens + choices, tpm)
        floor = min(wanted, MIN_OPEN_ENDED_GRANT, room)
        for attempt in range(GRANT_TRIES):
            cap = min(wanted, room)
            if flexible:
                left = await self.rate_limiter.available_tokens(principal)
                if left is not None:
                    cap = max(floor, min(cap, (left - prompt_tokens) // choices))
            try:
                reservation = await self.rate_limiter.reserve(
                    principal,
                    prompt_tokens + cap * choices,
                    requests=requests,
                    prompt_tokens=prompt_tokens,
                    quiet=quiet,
                )
            except RateLimitedError:
                if not flexible or cap == floor or attempt == GRANT_TRIES - 1:
                    raise
                continue  # others took part of the window meanwhile: grant what is left now
            return TokenGrant(reservation, cap if cap < wanted else None)
        raise AssertionError("unreachable")  # pragma: no cover

    async def submit_granted(self, grant: TokenGrant, submit: Callable[[], Sequence[Handle]]) -> list[Handle]:
        """``submit()`` the requests ``grant`` was reserved for; what they do not use is refunded once all
        have ended, however they end (everything, when submitting fails)."""
        reservation = grant.reservation
        try:
            handles = list(submit())
        except BaseException:
            await self.rate_limiter.refund(reservation, reservation.tokens if reservation else 0)
            raise
        self.refund_when_done(reservation, handles)
        return handles

    async def submit_budgeted(
        self,
        principal: str,
        params: Sequence[SamplingParams],
        submit: Callable[[], Sequence[Handle]],
        prompt_tokens: int = 0,
    ) -> list[Handle]:
        """Reserve ``prompt_tokens`` and the output budget of every request in ``params`` for
        ``principal``, then ``submit()`` them (see ``submit_granted``)."""
        return await self.submit_granted(await self.grant(principal, params, prompt_tokens), submit)

    async def submit_request_budgeted(
        self, principal: str, request: TextRequest, request_id: str, priority: Priority
    ) -> Handle:
        prompt_tokens = await self.count_prompt_tokens([request.prompt])
        grant = await self.grant(principal, [request.params], prompt_tokens, open_ended=request.open_ended)
        if grant.max_new_tokens is not None:
            params = dataclasses.replace(request.params, max_new_tokens=grant.max_new_tokens)
            request = dataclasses.replace(request, params=params)
        (handle,) = await self.submit_granted(
            grant, lambda: [self.submit_request(request, request_id, priority, tenant=principal)]
        )
        return handle

    def refund_when_done(self, reservation: Reservation | None, handles: Sequence[Handle]) -> None:
        if reservation is None:
            return
        task = asyncio.get_running_loop().create_task(self._refund_after(reservation, list(handles)))
        self._refunds.add(task)
        task.add_done_callback(self._refunds.discard)

    async def _refund_after(self, reservation: Reservation, handles: list[Handle]) -> None:
        await asyncio.gather(*(handle.result() for handle in handles), return_exceptions=True)
        await self._refund(reservation, handles)

    async def _refund(self, reservation: Reservation, handles: Sequence[Handle]) -> None:
        """Give back what ended ``handles`` did not use: all of it when none reached the engine; else the
        output they did not generate (the prompts were processed, so their share stays spent)."""
        used = 0
        if handles:
            used = reservation.prompt_tokens
            for handle in handles:
                outcome: GenerationResult | BaseException
                try:
                    outcome = await handle.result()
                except Exception as error:  # any ending without a result (the handle is done: no wait)
                    outcome = error
                used += tokens_used(handle, outcome)
        try:
            await self.rate_limiter.refund(reservation, reservation.tokens - used)
        except Exception:  # the limiter's store is down: the reservation simply stands
            logger.warning("Could not refund %d unused token(s)", reservation.tokens - used, exc_info=True)

    async def refund_unused(self, stored_reservation: str | None, handles: Sequence[Handle] | Handle | None) -> None:
        """A background job ended: give its submitter back the tokens it did not use (all of them when
        it never reached the engine). ``stored_reservation`` is what the job record keeps."""
        reservation = Reservation.decode(stored_reservation)
        if reservation is None:
            return
        if isinstance(handles, Handle):
            handles = [handles]
        await self._refund(reservation, list(handles or ()))

    async def finish(self, result: GenerationResult, request_id: str, principal: str | None = None) -> GenerationResult:
        """Record the result (metrics) and return it with its text filtered. Tokens are not charged
        here: the budget was reserved on admission (``submit_budgeted``). ``principal`` is accepted for
        existing callers and unused. The filtering runs off the event loop (a long text, many logprobs)."""
        self.metrics.observe_result(result, self.model_name)
        return await self.threads.run(lambda: self._filtered(result, request_id))

    def _filtered(self, result: GenerationResult, request_id: str) -> GenerationResult:
        if result.structured:
            return self._ended_at_match(result, request_id)
        text = self.filter_output(result.text, request_id)
        # Alternatives the model did not pick may hold filtered words.
        return self._visible(result if text == result.text else _with_text(result, text))

    async def response(self, result: GenerationResult, request_id: str, principal: str | None = None) -> TextResult:
        final = await self.finish(result, request_id, principal)
        return TextResult(
            generated_text=final.text,
            model=self.model_name,
            request_id=request_id,
            prompt_tokens=final.prompt_tokens,
            completion_tokens=final.completion_tokens,
            finish_reason=final.finish_reason.value,
            token_logprobs=None if final.token_logprobs is None else result_logprobs(final.token_logprobs),
            cached_tokens=final.cached_tokens,
            timings=ResultTimings(
                queue_s=final.timings.queue_s,
                time_to_first_token_s=final.timings.time_to_first_token_s,
                total_s=final.timings.total_s,
            ),
        )

    def streaming_filter(self, handle: Handle | None = None) -> StreamingFilter:
        """The stream's filter; for a structured row (``handle``'s request has a constraint) one that stops
        before the first match instead of redacting it (see ``_ended_at_match``)."""
        structured = handle is not None and handle.request.params.constraint is not None
        return StreamingFilter(self.content_filter, self.settings.output_filter_action, stop_at_match=structured)

    async def stream_text(
        self, handle: Handle, *, cancel_on_exit: bool = True, streaming_filter: StreamingFilter | None = None
    ) -> AsyncIterator[str]:
        """Filtered text deltas as the engine produces them (replayed from the start); the filter holds
        back a short tail so a blocked word is never sent in pieces. Unless told otherwise, cancels the
        generation when the consumer goes away. Pass ``streaming_filter`` to read what it let through
        (``StreamedLogprobs``)."""
        streaming_filter = streaming_filter or self.streaming_filter(handle)
        try:
            async for delta in handle.stream():
                safe = streaming_filter.push(delta)
                if safe:
                    yield safe
            tail = streaming_filter.finish()
            if tail:
                yield tail
        except ContentRejectedError:
            self.metrics.observe_filter("output", "reject")
            logger.warning(
                "Streamed text matched the content filter (action=reject)",
                extra={"request_id": handle.request.request_id},
            )
            raise
        finally:
            if cancel_on_exit and not handle.done:
                handle.cancel()


def _with_text(result: GenerationResult, text: str) -> GenerationResult:
    """The filtered result; its token log-probabilities would show the filtered words, so they go too
    (usage, cached tokens and the prompt's entries stay)."""
    return dataclasses.replace(result, text=text, token_logprobs=None if result.token_logprobs is None else ())


def _redacted_entry(entry: LogprobEntry, content_filter: ContentFilter) -> LogprobEntry:
    def clean(text: str) -> str:
        return content_filter.redact(text) if content_filter.find(text) else text

    return LogprobEntry(
        token_id=entry.token_id,
        token=clean(entry.token),
        logprob=entry.logprob,
        top=tuple(LogprobAlternative(t.token_id, clean(t.token), t.logprob) for t in entry.top),
    )


class StreamedLogprobs:
    """A streamed choice's log-probability entries, handed out no faster than the content filter lets
    their text through, and none from the first filtered word on: the tokens of a redacted word
    ("h", "ate") would otherwise spell it out next to the ``[redacted]`` text. (A non-streamed response
    with filtered text drops all its entries; a stream cannot take back what it sent before the match.)

    Each entry's end in the output text comes from decoding the tokens in context, as the engine does,
    so tokenizers whose tokens decode differently alone (a SentencePiece "▁hate") are placed right.
    Every entry that is handed out also has its own text and alternatives redacted."""

    def __init__(self, service: GenerationService, handle: Handle) -> None:
        self._service = service
        self._handle = handle
        self._detokenizer = None if service.tokenizer is None else IncrementalDetokenizer(service.tokenizer)
        self._ends: list[int] = []  # where each entry's text ends in the output
        self._text_length = 0
        self._sent = 0

    def take(self, streaming_filter: StreamingFilter, *, final: bool = False) -> list[LogprobEntry]:
        """Entries not handed out yet whose text the filter has let through (all of them, at the end
        of a stream without a match)."""
        entries = self._handle.token_logprobs
        for entry in entries[len(self._ends) :]:
            piece = entry.token if self._detokenizer is None else self._detokenizer.push(entry.token_id)
            self._text_length += len(piece)
            self._ends.append(self._text_length)
        matched_at = streaming_filter.first_match_start
        if final and matched_at is None:
            upto = len(entries)
        else:
            released = streaming_filter.released if matched_at is None else min(streaming_filter.released, matched_at)
            upto = self._sent
            while upto < len(self._ends) and self._ends[upto] <= released:
                upto += 1
        taken = entries[self._sent : upto]
        self._sent = max(self._sent, upto)
        return self._service.visible_logprobs(taken)
