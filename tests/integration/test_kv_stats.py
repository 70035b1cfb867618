"""/stats shows the paged KV cache's blocks (total, held now) for the server and per model, and preemptions:
the numbers an operator needs to see why requests wait for blocks."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from tests.support.waiting import wait_until
from textgen.engine.types import GenerationRequest, SamplingParams

MakeSettings = Callable[..., Any]
AppClient = Callable[..., Any]


async def test_stats_show_kv_blocks_held_while_a_sequence_runs(
    make_settings: MakeSettings, app_client: AppClient
) -> None:
    async with app_client(make_settings()) as (client, app):
        engine = app.state.textgen.engine
        idle = (await client.get("/stats")).json()
        assert idle["kv_blocks_total"] == engine.stats().kv_blocks_total > 0
        assert idle["kv_blocks_used"] == 0 and idle["preemptions"] == 0
        assert idle["models"][0]["kv_blocks_total"] == idle["kv_blocks_total"]

        # Hold the engine inside its first decode step: the sequence's blocks are taken and stay taken.
        core, real_step, release = engine.core, engine.core.step, threading.Event()
        entered = threading.Event()

        def held_step(decode_slots: Any, *args: Any) -> Any:
            if decode_slots:
                entered.set()
                release.wait(timeout=30)
            return real_step(decode_slots, *args)

        core.step = held_step
        try:
            params = SamplingParams(max_new_tokens=40, temperature=0.0, ignore_eos=True)
            handle = engine.submit(GenerationRequest("", params, prompt_ids=tuple(range(10, 110))))
            await wait_until(entered.is_set, what="the first decode step")
            busy = (await client.get("/stats")).json()
            # 100 prompt tokens and the first new one: 4 blocks of 32 positions, at least
            assert busy["kv_blocks_used"] >= 4, busy
            assert busy["models"][0]["kv_blocks_used"] == busy["kv_blocks_used"]
        finally:
            release.set()
            core.step = real_step
        await handle.result()

        # Its blocks are free again (kept as a cached prefix, evictable) — once the engine's idle work is done:
        # where decode steps write other bits than a prefill (this tiny model's PyTorch path), the finished
        # answer is prefilled for the prefix cache in a scratch slot while nothing else runs.
        async def all_blocks_back() -> bool:
            return bool((await client.get("/stats")).json()["kv_blocks_used"] == 0)

        await wait_until(all_blocks_back, what="every block back")
