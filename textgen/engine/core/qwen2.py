"""Qwen2 and Qwen2.5: the Llama decoder with biases on the query, key and value projections.

The biases travel with the fused qkv projection (``LinearFactory`` concatenates them with the rows), so the
PyTorch path and the fused step run them unchanged. Qwen2's optional sliding window (``use_sliding_window``,
off in the released checkpoints) falls back unless it is at least as wide as a slot.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

import textgen.engine.core.llama as llama
from textgen.engine.core.llama import LlamaWeights
from textgen.engine.core.weights import LinearFactory

MODEL_TYPES = ("qwen2",)


def unsupported_reason(model: PreTrainedModel, positions: int) -> str | None:
    return llama.family_reason(model, positions, MODEL_TYPES)


def build(model: PreTrainedModel, make: LinearFactory, dtype: torch.dtype, positions: int) -> LlamaWeights:
    return llama.assemble(model, make, dtype, positions, llama.separate_projections)
