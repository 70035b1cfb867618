"""Where a decode step's time goes: model forward vs sampling vs text assembly, in the batched engine.

    .venv/bin/python -m bench.profile_step --concurrency 32 --max-new-tokens 64

Runs the engine in-process on the bundled model (no HTTP), wraps the engine's step functions with
timers, sends C requests at once and prints the share of wall time spent in each.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import time
from collections.abc import Callable
from typing import Any

from textgen.config import load_settings
from textgen.engine import GenerationRequest, SamplingParams, create_engine, scheduler, sequence
from textgen.loader import load_model

SPENT: collections.Counter[str] = collections.Counter()


def timed(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            SPENT[name] += time.perf_counter() - started

    return wrapper


def instrument() -> None:
    scheduler.select_next_tokens = timed("sampling", scheduler.select_next_tokens)
    sequence.SequenceState.accept = timed("text assembly", sequence.SequenceState.accept)
    engine_class = scheduler.BatchedEngine
    engine_class._admit = timed("admission (tokenize)", engine_class._admit)  # type: ignore[method-assign]
    engine_class._retire = timed("retirement", engine_class._retire)  # type: ignore[method-assign]


def instrument_core(engine: Any) -> None:
    """The core's one forward pass per step (decode + any prefill), timed on the built core."""
    core = engine.core
    core.step = timed("model step (decode + prefill)", core.step)


async def profile(concurrency: int, max_new_tokens: int, dtype: str) -> None:
    settings = load_settings(dtype=dtype, engine="batched")
    engine = create_engine(settings, load_model(settings))
    await engine.start()
    instrument_core(engine)
    SPENT.clear()
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.8, top_p=0.95, ignore_eos=True)
    started = time.perf_counter()
    handles = [
        engine.submit(GenerationRequest(f"Write a short poem about the number {i} and", params))
        for i in range(concurrency)
    ]
    results = await asyncio.gather(*(h.result() for h in handles))
    wall = time.perf_counter() - started
    await engine.stop(1)
    tokens = sum(r.completion_tokens for r in results)
    print(f"C={concurrency}: {tokens} tokens in {wall:.2f}s = {tokens / wall:.1f} tok/s")
    for name, seconds in SPENT.most_common():
        print(f"  {name:32s} {seconds:7.2f}s  {100 * seconds / wall:5.1f}% of wall time")
    print(f"  {'everything else':32s} {wall - sum(SPENT.values()):7.2f}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    instrument()
    asyncio.run(profile(args.concurrency, args.max_new_tokens, args.dtype))


if __name__ == "__main__":
    main()
