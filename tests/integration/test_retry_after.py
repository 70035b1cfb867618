"""Retry-After on a full queue predicts the real wait: the batched engine on the tiny GPT-2, its queue
kept full, one request refused; the advertised wait is held against the moment the queue ahead of that
request has actually drained (every request waiting at the refusal started, and one more slot freed).

The requests name a large output budget (1000 tokens) but end much earlier, at a stop string: what real
requests do (they stop at EOS), and what an estimate built from budgets gets wrong by the ratio. Nothing
here sleeps: completions are timestamped as they are delivered, the test waits on them.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Any

from tests.support.waiting import wait_until
from textgen.api.errors import retry_after_headers
from textgen.engine.service_rate import RETRY_AFTER_MIN_S
from textgen.engine.types import GenerationRequest, GenerationResult, Handle, SamplingParams
from textgen.errors import QueueFullError

MakeSettings = Callable[..., Any]
AppClient = Callable[..., Any]

PROMPT = "The future of AI is"
SLOTS, WAITING = 2, 4
BUDGET = 1000
PROBE = 260  # tokens: the requests end after about 200 of their 1000, so the wait spans seconds, not ticks
FACTOR = 2.0  # the advertised wait lies within this factor of the real one, both ways
SEEDED = {"temperature": 1.0, "seed": 11, "ignore_eos": True}


def early_stop(text: str) -> str:
    """A piece of the seeded output whose first occurrence is about three quarters of the way in: every
    request with the same seed generates the same text, so each ends there, far below its budget."""
    for start in range(len(text) * 3 // 4, len(text) - 12):
        piece = text[start : start + 12]
        if text.find(piece) == start:
            return piece
    raise AssertionError(f"no unique piece in the seeded output {text!r}")


async def test_retry_after_predicts_when_the_queue_ahead_has_drained(
    make_settings: MakeSettings, app_client: AppClient
) -> None:
    async with app_client(make_settings(max_running=SLOTS, max_waiting=WAITING)) as (_client, app):
        engine = app.state.textgen.engine
        probe = await engine.submit(GenerationRequest(PROMPT, SamplingParams(max_new_tokens=PROBE, **SEEDED))).result()
        params = SamplingParams(max_new_tokens=BUDGET, stop=(early_stop(probe.text),), **SEEDED)
        finished_at: list[float] = []
        results: list[GenerationResult] = []

        async def timestamped(handle: Handle) -> None:
            results.append(await handle.result())
            finished_at.append(time.monotonic())

        tasks: list[asyncio.Task[None]] = []

        def fill() -> QueueFullError:
            """Submit until the engine refuses (all in one event-loop turn); the refusal."""
            while True:
                try:
                    handle = engine.submit(GenerationRequest(PROMPT, params))
                except QueueFullError as refused:
                    return refused
                tasks.append(asyncio.create_task(timestamped(handle)))

        fill()  # saturated: SLOTS running, WAITING waiting
        await wait_until(lambda: len(finished_at) >= SLOTS, timeout_s=120, what="the first round of completions")
        refused = fill()
        refused_at = time.monotonic()
        needed = WAITING + 1  # everyone waiting ahead, then a slot
        done_before = sum(1 for at in finished_at if at <= refused_at)
        await asyncio.gather(*tasks)
        real = finished_at[done_before + needed - 1] - refused_at
    advertised = refused.retry_after_s
    assert advertised is not None
    assert all(r.completion_tokens < BUDGET / 4 for r in results), [r.completion_tokens for r in results]
    # (A real wait under a second is advertised as the 1 s floor: the header counts whole seconds.)
    assert real / FACTOR <= advertised <= max(real * FACTOR, RETRY_AFTER_MIN_S), (
        f"advertised {advertised:.2f} s, real wait {real:.2f} s"
    )
    # What the 503 carries (the rendering through HTTP: test_openai_api's queue-full test): whole seconds, up.
    header = int(retry_after_headers(refused)["Retry-After"])
    assert header == math.ceil(advertised)
