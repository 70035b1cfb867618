"""The baseline engine: one pipeline() call per request, same contract as the batched engine."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.support.waiting import wait_until
from textgen.engine.threadpool import ThreadPoolEngine
from textgen.engine.types import EngineLimits, GenerationRequest, SamplingParams
from textgen.errors import DeadlineExceededError, GenerationCancelledError, PromptTooLongError, QueueFullError


@pytest.fixture
async def engine(tiny_loaded: Any) -> AsyncIterator[ThreadPoolEngine]:
    engine = ThreadPoolEngine(tiny_loaded, EngineLimits(max_waiting=2, max_prompt_tokens=12), workers=2, warmup=True)
    await engine.start()
    yield engine
    await engine.stop(0)


def request(**params: Any) -> GenerationRequest:
    timeout_s = params.pop("timeout_s", None)
    return GenerationRequest("The future of AI is", SamplingParams(**params), timeout_s=timeout_s)


async def test_generates_exact_budget_and_matches_the_batched_engine_greedily(
    engine: ThreadPoolEngine, tiny_loaded: Any
) -> None:
    from textgen.engine.scheduler import BatchedEngine

    params = {"max_new_tokens": 12, "temperature": 0.0, "ignore_eos": True}
    result = await engine.submit(request(**params)).result()
    assert result.completion_tokens == 12
    assert result.finish_reason == "length"
    batched = BatchedEngine(tiny_loaded, EngineLimits(), warmup=False)
    await batched.start()
    try:
        assert (await batched.submit(request(**params)).result()).text == result.text
    finally:
        await batched.stop(0)


async def test_stop_string_and_streaming(engine: ThreadPoolEngine) -> None:
    full = await engine.submit(request(max_new_tokens=30, temperature=0.0, ignore_eos=True)).result()
    stop = full.text[len(full.text) // 2 :][:3]
    handle = engine.submit(request(max_new_tokens=30, temperature=0.0, ignore_eos=True, stop=(stop,)))
    chunks = [c async for c in handle.stream()]
    result = await handle.result()
    assert result.finish_reason == "stop"
    assert result.text == full.text[: full.text.index(stop)] == "".join(chunks)


async def test_cancel_deadline_prompt_limit_and_queue_full(engine: ThreadPoolEngine) -> None:
    long = {"max_new_tokens": 900, "ignore_eos": True}
    victim = engine.submit(request(**long))
    await wait_until(lambda: victim.text_so_far != "", 30, "the victim generating")  # cancelled mid-generation
    victim.cancel()
    with pytest.raises(GenerationCancelledError):
        await victim.result()
    with pytest.raises(DeadlineExceededError):
        await engine.submit(request(timeout_s=0.2, **long)).result()
    with pytest.raises(PromptTooLongError):
        await engine.submit(GenerationRequest("word " * 40, SamplingParams(max_new_tokens=2))).result()
    # The expired request's thread stops at its next token; only then is the engine empty to be filled.
    await wait_until(lambda: engine.stats().running == 0, 30, "the engine's threads free again")
    handles = [engine.submit(request(**long)) for _ in range(4)]  # 2 workers + 2 waiting
    with pytest.raises(QueueFullError):
        engine.submit(request())
    for handle in handles:
        handle.cancel()
    await asyncio.gather(*(h.result() for h in handles), return_exceptions=True)
