"""Which input channels of each linear layer carry the widest activations, measured once at build time.

W8A8 (``linear.py``) keeps a few such channels in float: in transformers a handful of residual-stream
channels reach values hundreds of times larger than the rest, and quantizing them with the others would
leave the rest of each row only a few int8 levels. Which channels they are is a property of the model,
not of the input, so one forward pass over a short mixed text (``calibration.txt``: prose, a recipe, a
chat turn, code, numbers) finds them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

CALIBRATION_TEXT = Path(__file__).with_name("calibration.txt")
OUTLIER_CHANNELS = 16  # per layer input; 8 costs ~0.6% perplexity on SmolLM2, 32 ~0.35%
# GGUF block kernels (per-block int8 activations): 32 channels bring a re-quantized SmolLM2 Q4_0 from +1.1% to
# +0.9% perplexity vs float32; a vocabulary-wide output layer keeps 16 (each channel costs a float32 column of
# its weight: 1 MiB for Gemma's 262k outputs).
BLOCK_OUTLIER_CHANNELS = 32
WIDE_OUTPUT = 32768


def input_ranges(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> dict[str, torch.Tensor]:
    """Largest |input| per channel [K] of every linear (and GPT-2 Conv1D) layer, by module name."""
    ranges: dict[str, torch.Tensor] = {}
    hooks = []

    def record(name: str) -> Callable[[torch.nn.Module, tuple[torch.Tensor, ...]], None]:
        def hook(_module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            seen = inputs[0].detach().float().abs().flatten(0, -2).amax(dim=0)
            ranges[name] = seen if name not in ranges else torch.maximum(ranges[name], seen)

        return hook

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
            hooks.append(module.register_forward_pre_hook(record(name)))
    try:
        ids = tokenizer(CALIBRATION_TEXT.read_text(), return_tensors="pt").input_ids[:, :1024]
        with torch.inference_mode():
            model(ids.to(model.device), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return {name: r.cpu() for name, r in ranges.items()}


class _Recorder:
    """A kernel that notes the largest |input| per channel of every call, then computes as before."""

    def __init__(self, kernel: Any, seen: dict[int, torch.Tensor], key: int) -> None:
        self.kernel, self.seen, self.key = kernel, seen, key
        self.dtype = kernel.dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        widest = x.detach().float().abs().amax(dim=0)
        known = self.seen.get(self.key)
        self.seen[self.key] = widest if known is None else torch.maximum(known, widest)
        result: torch.Tensor = self.kernel(x)
        return result


def block_kernels(linears: Sequence[Any]) -> list[Any]:
    """The kernels built from GGUF blocks before activations could be measured (those with
    ``with_outliers``), in a fixed order: every layer's, tier by tier."""
    return [kernel for linear in linears for _, kernel in linear.kernels if hasattr(kernel, "with_outliers")]


def measure_block_outliers(
    linears: Sequence[Any], score: Callable[[list[int]], object], tokens: list[int]
) -> list[list[int]]:
    """Run ``score`` over the calibration tokens with every block kernel recording its inputs; the
    BLOCK_OUTLIER_CHANNELS widest input channels of each kernel (OUTLIER_CHANNELS for an output layer wider
    than WIDE_OUTPUT), in ``block_kernels`` order."""
    seen: dict[int, torch.Tensor] = {}
    kept: list[tuple[Any, list[tuple[float, Any]]]] = []
    for linear in linears:
        original = list(linear.kernels)
        kept.append((linear, original))
        linear.kernels = [
            (rows, _Recorder(kernel, seen, id(kernel)) if hasattr(kernel, "with_outliers") else kernel)
            for rows, kernel in original
        ]
    try:
        score(tokens)
    finally:
        for linear, original in kept:
            linear.kernels = original
    channels: list[list[int]] = []
    for kernel in block_kernels(linears):
        widest = seen.get(id(kernel))
        if widest is None:  # never called on the calibration text (cannot happen for a layer on the path)
            channels.append([])
            continue
        wanted = OUTLIER_CHANNELS if kernel.outlier_weight_t.shape[1] > WIDE_OUTPUT else BLOCK_OUTLIER_CHANNELS
        top = widest.topk(min(wanted, widest.numel())).indices.sort().values
        channels.append([int(c) for c in top])
    return channels


def apply_block_outliers(linears: Sequence[Any], channels: list[list[int]]) -> None:
    """Give each block kernel its outlier channels (``measure_block_outliers``' result, maybe cached)."""
    kernels = block_kernels(linears)
    if len(kernels) != len(channels):
        raise ValueError(f"{len(channels)} outlier lists for {len(kernels)} block kernels")
    for kernel, chosen in zip(kernels, channels, strict=True):
        kernel.with_outliers(torch.tensor(chosen, dtype=torch.long))


def calibration_tokens(tokenizer: PreTrainedTokenizerBase, limit: int) -> list[int]:
    ids: list[int] = tokenizer(CALIBRATION_TEXT.read_text()).input_ids
    return ids[:limit]


def outlier_channels(ranges: dict[str, torch.Tensor], name: str, in_features: int) -> torch.Tensor:
    """The OUTLIER_CHANNELS widest input channels of the layer called ``name`` (a suffix of its module
    name is enough: the cores name GPT-2's layers without the ``transformer.`` prefix)."""
    measured = ranges.get(name)
    if measured is None:
        measured = next((r for key, r in ranges.items() if key.endswith("." + name)), None)
    if measured is None or measured.numel() != in_features:
        raise KeyError(f"no activation range measured for layer {name!r}")
    return measured.topk(min(OUTLIER_CHANNELS, in_features)).indices.sort().values
