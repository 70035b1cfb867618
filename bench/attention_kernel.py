"""fused.c's rotary_cache_attention alone, in CPU time of this thread: ``rows`` new tokens of one sequence at
the end of ``positions`` cached positions (a prefill chunk, a cached turn's tail, or a decode step at rows=1),
and ``--batch`` sequences of one new token each (a batched decode step).

    OMP_NUM_THREADS=1 python -m bench.attention_kernel
    OMP_NUM_THREADS=1 python -m bench.attention_kernel --library /tmp/old/fused.so --library /tmp/new/fused.so

With several ``--library`` builds (A/B), each case's calls alternate between them, so a busy machine
disturbs them alike; each figure is the best of ``--repeats`` calls.

Shapes default to the bundled model's (9 query heads over 3 KV heads of 64); ``--heads 4 --kv-heads 1
--dim 256`` is Gemma 3 270M's. The cache is paged (blocks of ``--block-size``) through a shuffled table.
"""

from __future__ import annotations

import argparse
import ctypes
import time
from collections.abc import Callable

import torch

from textgen.engine.core.fused import FusedKernels, load_fused_kernels


def cpu_ms(runs: list[Callable[[], None]], repeats: int) -> list[float]:
    """Each run's best of ``repeats`` calls (the runs alternating), in ms of this thread's CPU time."""
    best = [float("inf")] * len(runs)
    for _ in range(repeats):
        for i, run in enumerate(runs):
            started = time.thread_time()
            run()
            best[i] = min(best[i], time.thread_time() - started)
    return [b * 1e3 for b in best]


def case(builds: list[FusedKernels], args: argparse.Namespace, rows: int, positions: int,
         sequences: int) -> list[float]:
    """CPU ms of one call per build: ``sequences`` sequences of ``positions`` positions, the last ``rows`` of
    each new."""
    torch.manual_seed(0)
    heads, kv_heads, dim, block = args.heads, args.kv_heads, args.dim, args.block_size
    per_sequence = -(-positions // block)
    pool = sequences * per_sequence + 1
    keys = (torch.randn(pool, kv_heads, block, dim) * 0.5).bfloat16()
    values = torch.randn(pool, kv_heads, block, dim).bfloat16()
    tables = torch.randperm(pool)[: sequences * per_sequence].view(sequences, per_sequence).contiguous()
    qkv = torch.randn(sequences * rows, (heads + 2 * kv_heads) * dim).bfloat16()
    angles = torch.arange(positions)[:, None] * 1e-3 * torch.arange(dim)[None, :]
    cos, sin = angles.cos().bfloat16(), angles.sin().bfloat16()
    at = torch.arange(positions - rows, positions, dtype=torch.long)
    where = torch.cat([at] * sequences)
    cache_rows = torch.arange(sequences, dtype=torch.long).repeat_interleave(rows)
    out = torch.empty(sequences * rows, heads * dim, dtype=torch.bfloat16)

    def call(kernels: FusedKernels) -> Callable[[], None]:
        return lambda: kernels.rotary_cache_attention(qkv, cos, sin, where, cache_rows, keys, values, out, heads,
                                                      dim**-0.5, tables)

    return cpu_ms([call(kernels) for kernels in builds], args.repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--library", action="append", help="a fused.c build to load instead of this tree's "
                        "(several: A/B, calls alternating)")
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--rows", default="1,16,188,256")
    parser.add_argument("--positions", default="1000,1180")
    parser.add_argument("--batch", default="8,32", help="decode steps of this many sequences (one row each)")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if args.library:
        builds = [FusedKernels(ctypes.CDLL(path)) for path in args.library]
    else:
        own = load_fused_kernels()
        assert own is not None, "no fused kernels"
        builds = [own]
    names = args.library or ["this tree"]
    print("us per row, best of", args.repeats, "|", " | ".join(names))
    for positions in (int(p) for p in args.positions.split(",")):
        for rows in (int(r) for r in args.rows.split(",")):
            figures = case(builds, args, rows, positions, 1)
            shown = "  ".join(f"{ms / rows * 1e3:8.1f}" for ms in figures)
            print(f"positions {positions:5d} rows {rows:4d}:        {shown}")
        for batch in (int(b) for b in args.batch.split(",") if b):
            figures = case(builds, args, 1, positions, batch)
            shown = "  ".join(f"{ms / batch * 1e3:8.1f}" for ms in figures)
            print(f"positions {positions:5d} batch {batch:3d} x 1 row: {shown}")


if __name__ == "__main__":
    main()
