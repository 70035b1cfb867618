"""Token budgets: reserved before submission, refunded when the request ends, however it ends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from textgen.config import load_settings
from textgen.content_filter import ContentFilter
from textgen.engine.types import (
    FinishReason,
    GenerationRequest,
    GenerationResult,
    Handle,
    RequestTimings,
    SamplingParams,
)
from textgen.errors import DeadlineExceededError, EngineError, QueueFullError, RateLimitedError
from textgen.generation import GenerationService, StreamSlots
from textgen.metrics import Metrics
from textgen.ratelimit import SQLiteRateLimiter, TokenBudgetTooLargeError

KEY = "key:0123456789abcdef"
FROZEN_TIME = 1_800_000_000.0  # seconds since the epoch, mid-minute


class HandleOnlyEngine:
    """Hands out handles the test resolves itself; nothing is generated."""

    name = "fake"

    def __init__(self) -> None:
        self.handles: list[Handle] = []

    def submit(self, request: GenerationRequest) -> Handle:
        handle = Handle(request, asyncio.get_running_loop())
        self.handles.append(handle)
        return handle


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[tuple[GenerationService, HandleOnlyEngine]]:
    # A frozen clock: on the wall clock a minute's boundary between reserving and probing would give the
    # whole budget back and fail an assertion by chance.
    limiter = SQLiteRateLimiter(
        tmp_path / "jobs.db", requests_per_minute=0, tokens_per_minute=100, clock=lambda: FROZEN_TIME
    )
    await limiter.open()
    engine = HandleOnlyEngine()
    settings = load_settings(max_new_tokens_limit=100)
    yield GenerationService(engine, ContentFilter([]), settings, "fake", Metrics(), limiter), engine  # type: ignore[arg-type]
    await limiter.close()


def result(tokens: int) -> GenerationResult:
    return GenerationResult("x" * tokens, 3, tokens, FinishReason.LENGTH, RequestTimings(0.0, None, 0.0))


async def fits(service: GenerationService, tokens: int) -> bool:
    """Whether ``tokens`` more could be reserved now (the probe's own reservation is given back)."""
    try:
        reservation = await service.reserve(KEY, tokens)
    except RateLimitedError:
        return False
    await service.rate_limiter.refund(reservation, tokens)
    return True


async def settle(service: GenerationService) -> None:
    await asyncio.gather(*list(service._refunds))


async def submit(service: GenerationService, engine: HandleOnlyEngine, max_new_tokens: int) -> Handle:
    params = SamplingParams(max_new_tokens=max_new_tokens)
    (handle,) = await service.submit_budgeted(
        KEY, [params], lambda: [engine.submit(GenerationRequest("p", params, "r"))]
    )
    return handle


Service = tuple[GenerationService, HandleOnlyEngine]


async def test_a_finished_request_pays_for_what_it_generated(service: Service) -> None:
    svc, engine = service
    handle = await submit(svc, engine, 60)
    assert not await fits(svc, 41)  # the whole budget is held while it runs
    handle.finish(result(25))
    await settle(svc)
    assert await fits(svc, 75) and not await fits(svc, 76)


@pytest.mark.parametrize("ending", ["cancelled", "deadline", "failed"])
async def test_a_request_without_a_result_pays_for_the_text_it_produced(
    ending: str, service: tuple[GenerationService, HandleOnlyEngine]
) -> None:
    svc, engine = service
    handle = await submit(svc, engine, 60)
    handle.publish("twelve chars")
    if ending == "cancelled":
        handle.fail_cancelled()
    else:
        handle.finish(None, DeadlineExceededError() if ending == "deadline" else EngineError())
    await settle(svc)
    assert await fits(svc, 88) and not await fits(svc, 89)


async def test_a_refused_submission_gives_everything_back(service: tuple[GenerationService, HandleOnlyEngine]) -> None:
    svc, _engine = service

    def refuse() -> list[Handle]:
        raise QueueFullError()

    with pytest.raises(QueueFullError):
        await svc.submit_budgeted(KEY, [SamplingParams(max_new_tokens=60)], refuse)
    assert await fits(svc, 100)


async def test_a_budget_that_does_not_fit_submits_nothing(service: tuple[GenerationService, HandleOnlyEngine]) -> None:
    svc, engine = service
    await submit(svc, engine, 60)
    with pytest.raises(RateLimitedError):
        await submit(svc, engine, 41)
    assert len(engine.handles) == 1


def test_budgets_come_from_max_new_tokens_max_length_or_the_default() -> None:
    svc = GenerationService(
        HandleOnlyEngine(), ContentFilter([]), load_settings(max_new_tokens_limit=100), "fake", Metrics()  # type: ignore[arg-type]
    )
    assert svc.token_budget(SamplingParams(max_new_tokens=7)) == 7
    assert svc.token_budget(SamplingParams(max_length=30)) == 30  # the prompt's share is unknown yet
    assert svc.token_budget(SamplingParams(max_new_tokens=5000)) == 100  # capped like the engine caps it
    assert svc.token_budget(SamplingParams()) == 50


def test_stream_slots_are_per_caller_and_freed_on_error() -> None:
    slots = StreamSlots(1)
    with pytest.raises(RuntimeError), slots.take("a"):
        raise RuntimeError("the stream never started")
    with slots.take("a"):
        assert slots.open_count("a") == 1
        with pytest.raises(RateLimitedError):
            slots.take("a")
        with slots.take("b"):
            pass
    assert slots.open_count("a") == 0 and slots.open_count("b") == 0


# ----- prompt tokens and requests that name no output limit ------------------------------------------------


async def test_prompt_tokens_are_reserved_and_stay_spent(service: Service) -> None:
    svc, engine = service
    params = SamplingParams(max_new_tokens=20)
    await svc.submit_budgeted(KEY, [params], lambda: [engine.submit(GenerationRequest("p", params, "r"))], 30)
    assert not await fits(svc, 51)  # 30 prompt + 20 output held while it runs
    engine.handles[0].finish(result(5))
    await settle(svc)
    assert await fits(svc, 65) and not await fits(svc, 66)  # 30 + 5 spent, 15 of the output back


async def test_a_job_that_never_ran_gets_its_prompt_share_back_too(service: Service) -> None:
    svc, _engine = service
    grant = await svc.grant(KEY, [SamplingParams(max_new_tokens=20)], 30)
    assert grant.reservation is not None and not await fits(svc, 51)
    await svc.refund_unused(grant.reservation.encode(), None)
    assert await fits(svc, 100)


class CharTokenizer:
    """One token per character; records what it was asked to count."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, text: str, add_special_tokens: bool = True) -> SimpleNamespace:
        self.calls.append(text)
        return SimpleNamespace(input_ids=list(text))


def test_the_prompt_counter_runs_only_under_a_token_limit() -> None:
    tokenizer = CharTokenizer()
    engine: Any = HandleOnlyEngine()
    svc = GenerationService(engine, ContentFilter([]), load_settings(), "fake", Metrics(), tokenizer=tokenizer)  # type: ignore[arg-type]
    assert asyncio.run(svc.count_prompt_tokens(["abc", "de"])) == 0 and tokenizer.calls == []  # no limit: no work


async def test_the_prompt_counter_sums_each_prompt_once(service: Service) -> None:
    svc, _engine = service
    svc.tokenizer = CharTokenizer()  # type: ignore[assignment]
    assert await svc.count_prompt_tokens(["abc", "de"]) == 5


async def test_an_open_ended_request_is_granted_what_the_window_has_left(service: Service) -> None:
    svc, _engine = service
    await svc.reserve(KEY, 30)  # 70 left
    grant = await svc.grant(KEY, [SamplingParams(max_new_tokens=100)], 10, open_ended=True)
    assert grant.max_new_tokens == 60 and grant.reservation is not None and grant.reservation.tokens == 70
    assert not await fits(svc, 1)


async def test_an_open_ended_request_in_an_empty_window_gets_the_whole_window(service: Service) -> None:
    svc, _engine = service
    grant = await svc.grant(KEY, [SamplingParams(max_new_tokens=100)] * 3, 10, open_ended=True)
    assert grant.max_new_tokens == 30  # three choices share the 90 tokens after the prompt
    full = await svc.grant("roomy", [SamplingParams(max_new_tokens=20)], 10, open_ended=True)
    assert full.max_new_tokens is None  # its default fits: it runs as asked


async def test_an_open_ended_request_waits_rather_than_run_on_crumbs(service: Service) -> None:
    svc, _engine = service
    await svc.reserve(KEY, 50)  # 50 left: 40 after the prompt, below the 50-token minimum grant
    with pytest.raises(RateLimitedError) as info:
        await svc.grant(KEY, [SamplingParams(max_new_tokens=100)], 10, open_ended=True)
    assert not isinstance(info.value, TokenBudgetTooLargeError) and info.value.retry_after_s is not None
    assert await fits(svc, 50)  # nothing was taken


async def test_background_grants_do_not_depend_on_the_window(service: Service) -> None:
    svc, _engine = service
    alone = await svc.grant("fresh", [SamplingParams(max_new_tokens=100)], 10, open_ended=True, flexible=False)
    assert alone.max_new_tokens == 90
    await svc.reserve(KEY, 30)
    with pytest.raises(RateLimitedError):  # the same grant (90 + 10) must wait for the next window
        await svc.grant(KEY, [SamplingParams(max_new_tokens=100)], 10, open_ended=True, flexible=False)


async def test_a_prompt_that_fills_the_window_can_never_run(service: Service) -> None:
    svc, _engine = service
    with pytest.raises(TokenBudgetTooLargeError) as info:
        await svc.grant(KEY, [SamplingParams(max_new_tokens=10)], 100, open_ended=True)
    assert "shorter prompt" in info.value.message
    with pytest.raises(TokenBudgetTooLargeError):
        await svc.grant(KEY, [SamplingParams(max_new_tokens=10)], 95)  # explicit: 105 > 100
    assert await fits(svc, 100)


def test_the_stream_cap_retry_after_predicts_when_an_open_stream_ends() -> None:
    """Not a fixed 5 s: the first of the caller's open streams to end, from the streams' ages and the
    lifetimes of recent streams (the median of those that lived longer than the open one so far)."""
    now = [0.0]
    slots = StreamSlots(1, clock=lambda: now[0])

    def refused_after() -> float:
        with pytest.raises(RateLimitedError) as refused:
            slots.take("a")
        assert refused.value.retry_after_s is not None
        return refused.value.retry_after_s

    first = slots.take("a")
    now[0] = 4.0
    assert refused_after() == 4.0  # nothing measured yet: as long again as it has run
    first.release()  # lived 4 s
    for lifetime in (10.0, 20.0, 30.0):  # three streams of another caller end: 10 s, 20 s and 30 s long
        began = now[0]
        other = slots.take("b")
        now[0] = began + lifetime
        other.release()
    first = slots.take("a")
    start = now[0]
    now[0] = start + 3.0
    assert refused_after() == 12.0  # the median of 4, 10, 20 and 30 is 15; 3 s gone
    now[0] = start + 15.0
    assert refused_after() == 10.0  # it outlived 10 s: of 20 and 30 the median is 25; 15 s gone
    now[0] = start + 45.0
    assert refused_after() == 45.0  # outlived every measured stream: as long again
    now[0] = start + 1000.0
    assert refused_after() == 300.0  # clamped: past five minutes a prediction says little
    first.release()
    assert slots.open_count("a") == 0 and slots.total == 0
