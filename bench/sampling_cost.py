"""What the OpenAI sampling fields cost a decode step's token selection (no model: random logits).

    python -m bench.sampling_cost                       # B = 32 rows, V = 49152 (the bundled model's vocabulary)
    python -m bench.sampling_cost --batch 8 --vocab 4096 --steps 20

For each workload, ``select_next_tokens`` (what the batched engine calls once per step) is timed over
``--steps`` steps on one thread: plain rows (greedy, and top-p sampling), then half the rows with
presence/frequency penalties, logit_bias, min_p. Plain rows must cost what they cost before these
fields existed (each field is skipped by one scan of the batch's params when no row asks for it).
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import replace

import torch

from textgen.engine.sampling import TokenPenalties, select_next_tokens
from textgen.engine.types import SamplingParams

LOG = logging.getLogger("bench.sampling_cost")


def time_step(params: list[SamplingParams], vocab: int, steps: int) -> float:
    """Median microseconds per ``select_next_tokens`` call for these rows."""
    logits = torch.randn(len(params), vocab)
    penalties = [TokenPenalties(vocab, p) if p.counts_tokens else None for p in params]
    for penalty in penalties:
        if penalty is not None:
            for token in torch.randint(0, vocab, (200,)).tolist():  # 200 generated tokens so far
                penalty.add(token)
    shared = torch.Generator().manual_seed(0)
    histories: list[list[int]] = [[] for _ in params]
    times = []
    for _ in range(steps):
        batch = logits.clone()
        started = time.perf_counter()
        select_next_tokens(batch, params, histories, [None] * len(params), shared, penalties=penalties)
        times.append(time.perf_counter() - started)
    return 1e6 * sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    rows = args.batch
    greedy, top_p = SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, top_p=0.95)

    def with_fields(params: SamplingParams) -> SamplingParams:
        bias = ((5, 3.0), (7, -100.0))
        return replace(params, frequency_penalty=0.5, presence_penalty=0.5, logit_bias=bias, min_p=0.05)

    workloads = {
        "greedy, plain": [greedy] * rows,
        "top_p 0.95, plain": [top_p] * rows,
        "greedy, half with the fields": [with_fields(greedy) if i % 2 else greedy for i in range(rows)],
        "top_p 0.95, half with the fields": [with_fields(top_p) if i % 2 else top_p for i in range(rows)],
    }
    for name, params in workloads.items():
        LOG.info("%-34s B=%d V=%d  %9.0f us/step", name, rows, args.vocab, time_step(params, args.vocab, args.steps))


if __name__ == "__main__":
    main()
