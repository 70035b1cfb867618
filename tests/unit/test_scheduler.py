"""The continuous-batching engine on the tiny GPT-2: correctness inside a shared batch, priorities,
backpressure, deadlines, cancellation, failures and shutdown."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from tests.support.engines import engines_stopped_after
from tests.support.waiting import wait_until
from textgen.engine.scheduler import BatchedEngine
from textgen.engine.types import EngineLimits, GenerationRequest, Handle, Priority, SamplingParams
from textgen.errors import (
    DeadlineExceededError,
    EngineError,
    GenerationCancelledError,
    NotReadyError,
    PromptTooLongError,
    QueueFullError,
)

LONG = SamplingParams(max_new_tokens=900, ignore_eos=True, temperature=0.0)


@pytest.fixture
async def make_engine(tiny_loaded: Any) -> AsyncIterator[Callable[..., Any]]:
    async with engines_stopped_after() as engines:

        async def build(**limits: Any) -> BatchedEngine:
            limits.setdefault("max_new_tokens_limit", 1000)
            return await engines.start(BatchedEngine(tiny_loaded, EngineLimits(**limits), warmup=False))

        yield build


def request(prompt: str = "The future of AI is", **params: Any) -> GenerationRequest:
    priority = params.pop("priority", Priority.INTERACTIVE)
    timeout_s = params.pop("timeout_s", None)
    params.setdefault("max_new_tokens", 16)
    return GenerationRequest(prompt, SamplingParams(**params), priority=priority, timeout_s=timeout_s)


def neighbours(engine: BatchedEngine, count: int) -> list[Handle]:
    return [
        engine.submit(request(f"Neighbour number {i} says", max_new_tokens=24, temperature=0.9, ignore_eos=True))
        for i in range(count)
    ]


async def test_seeded_request_is_the_same_alone_and_beside_31_others(make_engine: Callable[..., Any]) -> None:
    engine = await make_engine()
    seeded = {"temperature": 0.9, "top_p": 0.95, "seed": 1234, "max_new_tokens": 24, "ignore_eos": True}
    alone = await engine.submit(request(**seeded)).result()
    crowd = neighbours(engine, 31)
    beside = engine.submit(request(**seeded))
    results = await asyncio.gather(beside.result(), *(h.result() for h in crowd))
    assert results[0].text == alone.text
    assert len({r.text for r in results[1:]}) > 1  # the neighbours really sampled


async def test_greedy_tokens_identical_alone_and_batched(make_engine: Callable[..., Any], tiny_loaded: Any) -> None:
    engine = await make_engine()
    greedy = {"temperature": 0.0, "max_new_tokens": 30, "ignore_eos": True}
    prompts = ["The quick brown fox", "Once upon a time there was a robot who learned", "Hi"]
    alone = [await engine.submit(request(p, **greedy)).result() for p in prompts]
    crowd = neighbours(engine, 8)
    together = await asyncio.gather(*(engine.submit(request(p, **greedy)).result() for p in prompts))
    await asyncio.gather(*(h.result() for h in crowd))
    assert [r.text for r in together] == [r.text for r in alone]
    assert all(r.completion_tokens == 30 for r in together)


async def test_interactive_requests_are_admitted_before_background(make_engine: Callable[..., Any]) -> None:
    engine = await make_engine(max_running=1, background_share=100)
    blocker = engine.submit(request(**LONG.__dict__))
    await wait_until(lambda: engine.stats().running == 1)
    background = engine.submit(request(max_new_tokens=4, priority=Priority.BACKGROUND, ignore_eos=True))
    interactive = engine.submit(request(max_new_tokens=4, ignore_eos=True))
    blocker.cancel()
    finished: list[str] = []
    interactive._future.add_done_callback(lambda _: finished.append("interactive"))
    background._future.add_done_callback(lambda _: finished.append("background"))
    await asyncio.gather(interactive.result(), background.result())
    assert finished == ["interactive", "background"]


async def test_background_is_not_starved_by_steady_interactive_load(make_engine: Callable[..., Any]) -> None:
    engine = await make_engine(max_running=2, background_share=3)
    interactive = [engine.submit(request(max_new_tokens=6, ignore_eos=True)) for _ in range(6)]
    background = engine.submit(request(max_new_tokens=6, ignore_eos=True, priority=Priority.BACKGROUND))
    completed_interactive = 0
    while not background.done:
        # Keep the interactive queue non-empty the whole time.
        done = [h for h in interactive if h.done]
        completed_interactive += len(done)
        interactive = [h for h in interactive if not h.done]
        interactive += [engine.submit(request(max_new_tokens=6, ignore_eos=True)) for _ in done]
        assert completed_interactive < 40, "background job starved"
        # Top up again as soon as any request ends (interactive or the background one).
        ended = [asyncio.ensure_future(h.result()) for h in [*interactive, background]]
        await asyncio.wait(ended, return_when=asyncio.FIRST_COMPLETED)
        for waiting in ended:
            waiting.cancel()
    assert (await background.result()).completion_tokens == 6
    for handle in interactive:
        handle.cancel()


async def test_queue_full_rejects_interactive_with_retry_after(make_engine: Callable[..., Any]) -> None:
    engine = await make_engine(max_running=1, max_waiting=1)
    first = engine.submit(request(**LONG.__dict__))
    second = engine.submit(request(**LONG.__dict__))
    with pytest.raises(QueueFullError) as error:
        engine.submit(request())
    assert error.value.retry_after_s is not None and error.value.retry_after_s >= 1
    queued_job = engine.submit(request(priority=Priority.BACKGROUND))  # background is never refused
    for handle in (first, second, queued_job):
        handle.cancel()


async def test_deadline_while_waiting(make_engine: Callable[..., Any]) -> None:
    engine = await make_engine(max_running=1)
    blocker = engine.submit(request(**LONG.__dict__))
    await wait_until(lambda: engine.stats().running == 1)
    started = time.monotonic()
    with pytest.raises(DeadlineExceededError):
        await engine.submit(request(timeout_s=0.2)).result()
    assert time.monotonic() - started < 2.0
    blocker.cancel()


async def test_deadline_while_running_leaves_the_batch(make_engine: Callable[..., Any]) -> None:
    engine = await make_engine()
    handle = engine.submit(request(timeout_s=0.3, **LONG.__dict__))
    await wait_until(lambda: engine.stats().running == 1)
    with pytest.raises(DeadlineExceededError):
        await handle.result()
    await wait_until(lambda: engine.stats().running == 0, timeout_s=1.0)


async def test_cancel_leaves_the_batch_within_a_step(make_engine: Callable[..., Any]) -> None:
    engine = await make_engine()
    others = [engine.submit(request(**LONG.__dict__)) for _ in range(3)]
    victim = engine.submit(request(**LONG.__dict__))
    await wait_until(lambda: engine.stats().running == 4)
    victim.cancel()
    await wait_until(lambda: engine.stats().running == 3, timeout_s=1.0)
    with pytest.raises(GenerationCancelledError):
        await victim.result()
    assert not any(h.done for h in others)
    for handle in others:
        handle.cancel()
    await wait_until(lambda: engine.stats().running == 0, timeout_s=1.0)


async def test_stop_string_max_length_and_prompt_limits(make_engine: Callable[..., Any], tiny_loaded: Any) -> None:
    engine = await make_engine(max_prompt_tokens=12)
    full = await engine.submit(request(temperature=0.0, max_new_tokens=40, ignore_eos=True)).result()
    stop = full.text[len(full.text) // 2 :][:3]
    assert stop.strip(), "tiny model produced whitespace only"
    stopped = await engine.submit(request(temperature=0.0, max_new_tokens=40, ignore_eos=True, stop=(stop,))).result()
    assert stopped.finish_reason == "stop"
    assert stopped.text == full.text[: full.text.index(stop)]
    prompt_tokens = len(tiny_loaded.tokenizer("The future of AI is").input_ids)
    by_length = await engine.submit(
        request(max_new_tokens=None, max_length=prompt_tokens + 7, ignore_eos=True)
    ).result()
    assert by_length.completion_tokens == 7
    assert by_length.finish_reason == "length"
    with pytest.raises(PromptTooLongError, match="TEXTGEN_MAX_PROMPT_TOKENS"):
        await engine.submit(request("word " * 40)).result()


async def test_stream_yields_the_text_as_it_is_made(make_engine: Callable[..., Any]) -> None:
    engine = await make_engine()
    handle = engine.submit(request(max_new_tokens=20, ignore_eos=True, temperature=0.0))
    chunks = [chunk async for chunk in handle.stream()]
    assert len(chunks) > 1
    assert "".join(chunks) == (await handle.result()).text


async def test_a_failing_step_fails_only_its_batch(
    make_engine: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = await make_engine()
    real_step = engine.core.step
    calls = {"n": 0}

    def flaky_step(*args: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected failure")
        return real_step(*args)

    monkeypatch.setattr(engine.core, "step", flaky_step)
    victims = [engine.submit(request(max_new_tokens=10, ignore_eos=True)) for _ in range(2)]
    for victim in victims:
        with pytest.raises(EngineError):
            await victim.result()
    after = await engine.submit(request(max_new_tokens=5, ignore_eos=True)).result()
    assert after.completion_tokens == 5
    assert engine.ready


async def test_stop_drains_then_refuses(make_engine: Callable[..., Any]) -> None:
    engine = await make_engine()
    short = engine.submit(request(max_new_tokens=5, ignore_eos=True))
    long = engine.submit(request(**LONG.__dict__))
    await engine.stop(grace_s=0.3)
    assert (await short.result()).completion_tokens == 5
    with pytest.raises(NotReadyError):
        await long.result()
    with pytest.raises(NotReadyError):
        engine.submit(request())
    assert not engine.ready


async def test_budget_is_capped_by_the_model_context(make_engine: Callable[..., Any], tiny_loaded: Any) -> None:
    engine = await make_engine(max_new_tokens_limit=5000, max_prompt_tokens=5000)
    context = tiny_loaded.context_length
    assert context == 1024
    prompt_tokens = len(tiny_loaded.tokenizer("The future of AI is").input_ids)
    result = await engine.submit(request(max_new_tokens=2000, ignore_eos=True)).result()
    assert result.completion_tokens == context - prompt_tokens
    with pytest.raises(PromptTooLongError, match="context length"):
        await engine.submit(request("word " * 1100, max_new_tokens=1)).result()


async def test_a_burst_of_prompts_is_prefilled_a_step_budget_at_a_time(make_engine: Callable[..., Any]) -> None:
    """With a budget of one short prompt per step, a burst of four is prefilled over four steps while the
    earlier ones already decode, and every answer equals the one from a single big prefill."""
    prompts = [f"Burst prompt number {i}" for i in range(4)]
    greedy = {"max_new_tokens": 8, "temperature": 0.0, "ignore_eos": True}
    reference_engine = await make_engine()
    reference = [r.text for r in await asyncio.gather(*(reference_engine.submit(request(p, **greedy)).result()
                                                       for p in prompts))]
    engine = await make_engine(prefill_step_tokens=1)
    calls: list[tuple[int, int]] = []
    step = engine.core.step

    def recording_step(decode_slots: Any, tokens: Any, prefill_slots: Any, prompt_ids: Any) -> Any:
        calls.append((len(decode_slots), len(prefill_slots)))
        return step(decode_slots, tokens, prefill_slots, prompt_ids)

    engine.core.step = recording_step  # type: ignore[method-assign]
    results = await asyncio.gather(*(engine.submit(request(p, **greedy)).result() for p in prompts))
    assert [r.text for r in results] == reference
    prefill_calls = [(decoding, prefilled) for decoding, prefilled in calls if prefilled]
    assert prefill_calls == [(0, 1), (1, 1), (2, 1), (3, 1)]


async def test_a_prompt_cancelled_in_the_prefill_backlog_ends_there(make_engine: Callable[..., Any]) -> None:
    engine = await make_engine(prefill_step_tokens=1)
    prefilled: list[int] = []
    step = engine.core.step

    def recording_step(decode_slots: Any, tokens: Any, prefill_slots: Any, prompt_ids: Any) -> Any:
        prefilled.extend(len(p) for p in prompt_ids)
        return step(decode_slots, tokens, prefill_slots, prompt_ids)

    engine.core.step = recording_step  # type: ignore[method-assign]
    handles = [engine.submit(request(f"Backlog prompt {i}", **LONG.__dict__)) for i in range(24)]
    last = engine.submit(request("A much longer last prompt that is cancelled before its turn", **LONG.__dict__))
    await wait_until(lambda: engine.stats().running == 25)  # all admitted; one prompt is prefilled per step
    last.cancel()
    with pytest.raises(GenerationCancelledError):
        await last.result()
    await wait_until(lambda: engine.stats().running == 24, timeout_s=2.0)
    for handle in handles:
        handle.cancel()
    await wait_until(lambda: engine.stats().running == 0, timeout_s=2.0)
    assert len(prefilled) < 25 and max(prefilled) < len(engine._loaded.tokenizer(last.request.prompt).input_ids)
