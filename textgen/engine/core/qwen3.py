"""Qwen3 (dense): the Llama decoder with an RMSNorm over each query and key head before the rotary.

In the PyTorch path the two norms' weights are one [Hq + Hkv, D] table, so one call normalises every head of
a step's fused qkv output in place; fused.c's rotary attention normalises each head as it rotates it. Qwen3's
attention has no biases by default (``attention_bias``); where a checkpoint has them they travel with qkv.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from transformers import PreTrainedModel

import textgen.engine.core.llama as llama
from textgen.engine.core.llama import LlamaLayer, LlamaWeights
from textgen.engine.core.weights import LinearFactory

MODEL_TYPES = ("qwen3",)


def unsupported_reason(model: PreTrainedModel, positions: int) -> str | None:
    return llama.family_reason(model, positions, MODEL_TYPES)


def build(model: PreTrainedModel, make: LinearFactory, dtype: torch.dtype, positions: int) -> LlamaWeights:
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads

    def layer_of(layer: Any, prefix: str, make: LinearFactory, dtype: torch.dtype) -> LlamaLayer:
        attn = layer.self_attn
        return dataclasses.replace(
            llama.separate_projections(layer, prefix, make, dtype),
            qk_norm=llama.per_head_norms(attn.q_norm, attn.k_norm, heads, kv_heads, dtype),
            q_norm=llama.layer_weight(attn.q_norm, dtype),
            k_norm=llama.layer_weight(attn.k_norm, dtype),
        )

    return llama.assemble(model, make, dtype, positions, layer_of)
