"""Perplexity of a GGUF model served from its own blocks vs the same file de-quantized to float32.

    .venv/bin/python -m bench.gguf_perplexity --model /path/file.gguf [--text tests/data/english.txt]

Both runs read the file directly (TEXTGEN_GGUF_LOAD=direct) and score the text with the decode core in
one pass: ``kept`` with TEXTGEN_WEIGHTS=auto (the file's blocks through the Q4 and 8-bit block kernels,
activations in bf16), ``float32`` with TEXTGEN_WEIGHTS=float and TEXTGEN_DTYPE=float32 (every weight
de-quantized exactly). The target: kept within 1% of float32. Prints one JSON line per run and the ratio.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from textgen.config import Settings
from textgen.engine.core import CoreOptions, build_core
from textgen.loader import load_model


def perplexity(model: str, weights: str, dtype: str, text: str, max_tokens: int) -> dict[str, object]:
    started = time.perf_counter()
    settings = Settings(model=model, gguf_load="direct", dtype=dtype, weights=weights)  # type: ignore[arg-type]
    loaded = load_model(settings)
    core = build_core(loaded, CoreOptions(weights=weights, slots=1, positions=max_tokens + 1))
    ready = time.perf_counter() - started
    tokens = loaded.tokenizer(text).input_ids[:max_tokens]
    logits = core.score(tokens)
    nll = torch.nn.functional.cross_entropy(logits[:-1].float(), torch.tensor(tokens[1:]), reduction="mean")
    return {
        "weights": weights,
        "dtype": dtype,
        "core": core.describe()["weights"],
        "tokens": len(tokens),
        "perplexity": round(math.exp(float(nll)), 4),
        "load_s": round(ready, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--text", type=Path, default=Path("tests/data/english.txt"))
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--bf16-float", action="store_true", help="also score bf16 de-quantized weights")
    args = parser.parse_args()
    text = args.text.read_text()
    if args.bf16_float:
        print(json.dumps(perplexity(args.model, "float", "bfloat16", text, args.max_tokens)), flush=True)
    kept = perplexity(args.model, "auto", "bfloat16", text, args.max_tokens)
    print(json.dumps(kept), flush=True)
    reference = perplexity(args.model, "float", "float32", text, args.max_tokens)
    print(json.dumps(reference), flush=True)
    ratio = float(kept["perplexity"]) / float(reference["perplexity"])  # type: ignore[arg-type]
    print(json.dumps({"kept_over_float32": round(ratio, 4), "within_1_percent": abs(ratio - 1) <= 0.01}))


if __name__ == "__main__":
    main()
