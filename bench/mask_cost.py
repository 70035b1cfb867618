"""What structured output costs per decode step: computing and applying the token masks of R
constrained rows (``textgen.engine.constraints.apply_token_masks``, the function the engine calls),
on the model's real tokenizer and vocabulary, without the model.

    python -m bench.mask_cost                       # bundled model's tokenizer, rows 1, 8, 32
    python -m bench.mask_cost --rows 1,32 --steps 200 --model /path/to/model-folder

Each step masks random logits [R, V], picks every row's most likely allowed token and advances its
grammar (a row whose JSON is complete starts again), so the masks follow real parser states. ``make
bench`` runs it after the load benchmark when the json mode ran, and results.md reports it beside the
json/generate throughput ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO_ROOT))

# The schema the benchmark's json mode sends: a small record, about 40-60 tokens of compact JSON.
BENCH_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 60},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 4},
        "rating": {"type": "integer", "minimum": 1, "maximum": 5},
        "summary": {"type": "string", "maxLength": 120},
    },
    "required": ["title", "tags", "rating", "summary"],
    "additionalProperties": False,
}


def load_tokenizer(model: str) -> Any:
    """The tokenizer of ``model`` as the service names it (``bundled``, a folder or a .gguf file)."""
    from transformers import AutoTokenizer

    from textgen.loader import resolve_source

    source = resolve_source(model)
    if source.gguf_file:
        return AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file)
    return AutoTokenizer.from_pretrained(source.location, local_files_only=True)


def measure(tokenizer: Any, rows: int, steps: int, schema: dict[str, Any] = BENCH_SCHEMA) -> dict[str, float]:
    """Mean and p95 milliseconds per step to mask ``rows`` constrained rows."""
    # Imported here: bench.bench imports this module for BENCH_SCHEMA and stays free of torch.
    import torch

    from textgen.engine.constraints import Constraint, GrammarCompiler, RowConstraint, apply_token_masks

    eos = frozenset({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
    compiled = GrammarCompiler(tokenizer, eos).compile(Constraint.json_schema(schema))
    vocab = len(tokenizer)
    states: list[RowConstraint] = [compiled.start() for _ in range(rows)]
    generator = torch.Generator().manual_seed(0)
    timings: list[float] = []
    for _ in range(steps):
        logits = torch.randn(rows, vocab, generator=generator)
        started = time.perf_counter()
        apply_token_masks(logits, states)
        timings.append(time.perf_counter() - started)
        for row, token in enumerate(logits.argmax(-1).tolist()):
            if token in eos or not states[row].advance(token) or states[row].ended:
                states[row] = compiled.start()
    timings.sort()
    return {
        "rows": rows,
        "vocab": vocab,
        "steps": steps,
        "mean_ms": 1000 * sum(timings) / len(timings),
        "p95_ms": 1000 * timings[min(len(timings) - 1, int(0.95 * len(timings)))],
    }


def measure_all(model: str, rows: Sequence[int], steps: int) -> list[dict[str, float]]:
    tokenizer = load_tokenizer(model)
    return [measure(tokenizer, count, steps) for count in rows]


def render(results: Sequence[dict[str, float]]) -> list[str]:
    return [
        f"- {int(r['rows'])} constrained rows (vocabulary {int(r['vocab'])}): "
        f"{r['mean_ms']:.2f} ms per step mean, {r['p95_ms']:.2f} ms p95 ({int(r['steps'])} steps)"
        for r in results
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.mask_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled", help="as TEXTGEN_MODEL: bundled, a folder or a .gguf")
    parser.add_argument("--rows", default="1,8,32", help="constrained rows per step (default 1,8,32)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    results = measure_all(args.model, [int(r) for r in args.rows.split(",") if r.strip()], args.steps)
    print(json.dumps(results, indent=2) if args.json else "\n".join(render(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
