"""Perplexity of a GGUF model served from its own blocks vs the same file de-quantized to float32.

    .venv/bin/python -m bench.gguf_perplexity --model /path/file.gguf [--text tests/data/english.txt]

Both runs read the file directly (TEXTGEN_GGUF_LOAD=direct) and score the text with the decode core in
one pass: ``kept`` with TEXTGEN_WEIGHTS=auto (the file's blocks through the Q4 and 8-bit block kernels,
activations in bf16), ``float32`` with TEXTGEN_WEIGHTS=float and TEXTGEN_DTYPE=float32 (every weight
de-quantized exactly). The target: kept within 1% of float32. Prints one JSON line per run and the ratio.
``--requantize Q4_0`` (Q4_1, Q5_0, Q5_1, Q8_0, F16, BF16) serves the same model as if the file stored its
projections in that type (values re-quantized with gguf-py), for formats no file at hand uses.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from textgen.config import Settings
from textgen.engine.core import CoreOptions, build_core
from textgen.gguf_formats import FLOAT_TYPES, Blocks, float_tensor, unpack
from textgen.loader import LoadedModel, load_model


def requantized(loaded: LoadedModel, type_name: str) -> None:
    """Serve every projection as if the file stored it in type_name: its values re-quantized with gguf-py
    (for formats no file at hand uses; gguf-py cannot write K-quants)."""
    from gguf import GGMLQuantizationType, quants

    source = loaded.gguf_weights
    assert source is not None
    original = source.blocks
    qtype = GGMLQuantizationType[type_name]

    def blocks(layer: str) -> Blocks | torch.Tensor:
        values = _dequantized(original(layer))
        data = quants.quantize(values.numpy(), qtype)
        if type_name in FLOAT_TYPES:
            return float_tensor(data.view(np.uint8), type_name, tuple(values.shape))
        return unpack(data, type_name, (values.shape[0], values.shape[1]))

    source.dequantized = lambda layer: _dequantized(original(layer))  # type: ignore[method-assign]
    source.blocks = blocks  # type: ignore[method-assign]


def _dequantized(weight: Blocks | torch.Tensor) -> torch.Tensor:
    return weight.dequantize() if isinstance(weight, Blocks) else weight.float()


def perplexity(
    model: str, weights: str, dtype: str, text: str, max_tokens: int, requantize: str | None = None
) -> dict[str, object]:
    started = time.perf_counter()
    settings = Settings(model=model, gguf_load="direct", dtype=dtype, weights=weights)  # type: ignore[arg-type]
    loaded = load_model(settings)
    if requantize:
        requantized(loaded, requantize)
    core = build_core(loaded, CoreOptions(weights=weights, slots=1, positions=max_tokens + 1))
    ready = time.perf_counter() - started
    tokens = loaded.tokenizer(text).input_ids[:max_tokens]
    logits = core.score(tokens)
    nll = torch.nn.functional.cross_entropy(logits[:-1].float(), torch.tensor(tokens[1:]), reduction="mean")
    return {
        "weights": weights,
        "stored_as": requantize or "file",
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
    parser.add_argument("--requantize", help="serve the projections re-quantized to this GGUF type (Q4_0, Q8_0, ...)")
    args = parser.parse_args()
    text = args.text.read_text()
    if args.bf16_float:
        print(json.dumps(perplexity(args.model, "float", "bfloat16", text, args.max_tokens)), flush=True)
    kept = perplexity(args.model, "auto", "bfloat16", text, args.max_tokens, args.requantize)
    print(json.dumps(kept), flush=True)
    reference = perplexity(args.model, "float", "float32", text, args.max_tokens, args.requantize)
    print(json.dumps(reference), flush=True)
    ratio = float(kept["perplexity"]) / float(reference["perplexity"])  # type: ignore[arg-type]
    print(json.dumps({"kept_over_float32": round(ratio, 4), "within_1_percent": abs(ratio - 1) <= 0.01}))


if __name__ == "__main__":
    main()
