"""The model core's own decode rate, measured in isolation (no HTTP, no scheduler, no sampling).

    python -m bench.core_rate                          # bundled model, weights auto, B = 1, 8, 32, 64
    python -m bench.core_rate --weights int4 --batches 1,64 --steps 64
    python -m bench.core_rate --json out.json          # machine-readable, as bench.bench uses it

For each batch size B: B slots are prefilled with ~15-token prompts, a few steps warm up, then
``--steps`` decode steps are timed (greedy next token from the logits, as cheap as it gets). The
cache grows by one position per step, as in serving. ``TEXTGEN_*`` settings apply (model, device,
threads); the engine's end-to-end figure in ``bench.bench`` is compared against this one.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from textgen.config import load_settings
from textgen.engine import core_options_from_settings
from textgen.engine.core import ModelCore, build_core
from textgen.loader import load_model

LOG = logging.getLogger("bench.core_rate")
PROMPT = "Write a short story about a robot who learns to paint, in the style of a fairy tale."
WARMUP_STEPS = 3


def measure_batch(core: ModelCore, prompt_ids: list[int], batch: int, steps: int) -> dict[str, float]:
    slots = [core.allocate() for _ in range(batch)]
    try:
        logits = core.prefill(slots, [prompt_ids] * batch)
        order = core.slots_in_order()
        position = {slot: i for i, slot in enumerate(slots)}
        tokens = logits.argmax(-1)[[position[s] for s in order]]
        for _ in range(WARMUP_STEPS):
            tokens = core.decode(order, tokens).argmax(-1)
        started = time.perf_counter()
        for _ in range(steps):
            tokens = core.decode(order, tokens).argmax(-1)
        elapsed = time.perf_counter() - started
    finally:
        core.free(slots)
    return {"batch": batch, "ms_per_step": 1e3 * elapsed / steps, "steps_per_s": steps / elapsed,
            "tokens_per_s": batch * steps / elapsed}


def measure(batches: list[int], steps: int, **overrides: Any) -> dict[str, Any]:
    settings = load_settings(warmup=False, max_running=max(batches), **overrides)
    loaded = load_model(settings)
    core = build_core(loaded, core_options_from_settings(settings))
    prompt_ids = list(loaded.tokenizer(PROMPT).input_ids)
    rows = [measure_batch(core, prompt_ids, b, steps) for b in batches]
    for row in rows:
        LOG.info("B=%3d  %7.2f ms/step  %7.1f tok/s", row["batch"], row["ms_per_step"], row["tokens_per_s"])
    return {"model": loaded.name, "core": core.describe(), "threads": torch.get_num_threads(), "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,8,32,64")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--weights", default=None, help="TEXTGEN_WEIGHTS for this run")
    parser.add_argument("--core", default=None, help="TEXTGEN_CORE for this run")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    overrides = {k: v for k, v in (("weights", args.weights), ("core", args.core)) if v}
    result = measure([int(b) for b in args.batches.split(",")], args.steps, **overrides)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
