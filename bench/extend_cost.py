"""What a step of DecodeCore.extend costs on the bundled model, in CPU time of this thread (stable on a busy
machine, where wall-clock is not): the questions issue 24's leftovers asked.

    TEXTGEN_TORCH_THREADS=1 python -m bench.extend_cost

1. A speculative verification step: one sequence, its token and k drafted tokens, against a plain step
   (speculation.DRAFT_COST assumes 0.1 of a step per drafted token).
2. A cached prefix: a whole prefill of ``--prompt`` tokens against the same prompt's last ``--tail`` tokens
   after ``--cached`` cached positions (the chat workload's later turns), and the share of the attention
   kernel in each (fused.c's rotary_cache_attention).
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from textgen.config import load_settings
from textgen.engine import core_options_from_settings
from textgen.engine.core import build_core
from textgen.engine.core.decoder import DecodeCore
from textgen.engine.core.fused import FusedKernels
from textgen.loader import load_model

LOG = logging.getLogger("bench.extend_cost")


def cpu_ms(run: Callable[[], Any], repeats: int) -> float:
    """The best of ``repeats`` runs, in ms of this thread's CPU time."""
    best = float("inf")
    for _ in range(repeats):
        started = time.thread_time()
        run()
        best = min(best, time.thread_time() - started)
    return best * 1e3


def verification_cost(core: DecodeCore, drafts: list[int], repeats: int) -> None:
    slot = core.allocate()
    try:
        core.prefill([slot], [list(range(100, 140))])
        length = core.length(slot)

        def step(k: int) -> Callable[[], None]:
            def run() -> None:
                core.extend([slot], [[5] * (k + 1)], scored=[k + 1])
                core.truncate(slot, length)
            return run

        plain = cpu_ms(step(0), repeats)
        LOG.info("plain step (B=1): %.2f ms", plain)
        for k in drafts:
            cost = cpu_ms(step(k), repeats)
            LOG.info("token + %d drafts: %.2f ms (x%.3f; %.3f of a step per drafted token)", k, cost, cost / plain,
                     (cost / plain - 1) / k)
    finally:
        core.free([slot])


def attention_ms(core: DecodeCore, run: Callable[[], Any]) -> tuple[float, float]:
    """(whole step, the attention kernel's part), ms of CPU time."""
    spent = [0.0]
    kernel = FusedKernels.rotary_cache_attention

    def timed(self: FusedKernels, *args: Any, **kwargs: Any) -> None:
        started = time.thread_time()
        kernel(self, *args, **kwargs)
        spent[0] += time.thread_time() - started

    FusedKernels.rotary_cache_attention = timed  # type: ignore[method-assign]
    try:
        total = cpu_ms(run, 1)
    finally:
        FusedKernels.rotary_cache_attention = kernel  # type: ignore[method-assign]
    return total, spent[0] * 1e3


def _call(function: Callable[..., Any], *args: Any) -> Callable[[], Any]:
    return lambda: function(*args)


def prefix_cost(core: DecodeCore, prompt: int, cached: int, tail: int, repeats: int) -> None:
    ids = torch.randint(100, 40000, (prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    size = core.prefix_block_size
    cached -= cached % size
    for _ in range(repeats):
        first = core.allocate()
        whole = attention_ms(core, _call(core.prefill, [first], [ids]))
        keys = [("bench", i) for i in range(cached // size)]
        core.publish_prefix(first, keys)
        blocks = core.hold_prefix(keys)
        second = core.allocate()
        core.load_prefix(second, blocks)
        core.release_blocks(blocks)
        rest = attention_ms(core, _call(core.extend, [second], [ids[cached : cached + tail]]))
        core.free([second, first])
        LOG.info("whole prefill of %d: %.0f ms (attention %.0f); %d after %d cached: %.0f ms (attention %.0f); "
                 "ratio %.2f", prompt, whole[0], whole[1], tail, cached, rest[0], rest[1], whole[0] / rest[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--drafts", default="1,2,4,6")
    parser.add_argument("--prompt", type=int, default=1180)
    parser.add_argument("--cached", type=int, default=992)
    parser.add_argument("--tail", type=int, default=188)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = load_settings(warmup=False)
    core = build_core(load_model(settings), core_options_from_settings(settings))
    if not isinstance(core, DecodeCore):
        raise SystemExit("this benchmark needs the textgen core (DecodeCore)")
    verification_cost(core, [int(k) for k in args.drafts.split(",")], 20 * args.repeats)
    prefix_cost(core, args.prompt, args.cached, args.tail, args.repeats)


if __name__ == "__main__":
    main()
