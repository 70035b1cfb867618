"""Token budgets: reserved before submission, refunded when the request ends, however it ends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from textgen.config import load_settings
from textgen.content_filter import ContentFilter
from textgen.engine.types import (
    FinishReason,
    GenerationRequest,
    GenerationResult,
    Handle,
    SamplingParams,
    Timings,
)
from textgen.errors import DeadlineExceededError, EngineError, QueueFullError, RateLimitedError
from textgen.generation import GenerationService, StreamSlots
from textgen.metrics import Metrics
from textgen.ratelimit import SQLiteRateLimiter

KEY = "key:0123456789abcdef"


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
    limiter = SQLiteRateLimiter(tmp_path / "jobs.db", requests_per_minute=0, tokens_per_minute=100)
    await limiter.open()
    engine = HandleOnlyEngine()
    settings = load_settings(max_new_tokens_limit=100)
    yield GenerationService(engine, ContentFilter([]), settings, "fake", Metrics(), limiter), engine  # type: ignore[arg-type]
    await limiter.close()


def result(tokens: int) -> GenerationResult:
    return GenerationResult("x" * tokens, 3, tokens, FinishReason.LENGTH, Timings(0.0, None, 0.0))


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
