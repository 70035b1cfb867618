"""Phi-3 and Phi-3.5 (mini, medium): the Llama decoder from checkpoints that store qkv and gate/up fused.

``qkv_proj`` holds the query, key and value rows in that order and ``gate_up_proj`` the gate rows then the
up rows: the layouts the decoder computes with, so each becomes one linear layer as it is. The 128k
variants' longrope runs with its short factors, which transformers uses up to the original context
(4,096 positions): longer slots fall back. Phi-3-mini-4k attends within a 2,047-token window, which is
exact here only while a slot holds no more positions than that; Phi-4-mini's partial rotary falls back.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel

import textgen.engine.core.llama as llama
from textgen.engine.core.llama import LlamaLayer, LlamaWeights
from textgen.engine.core.weights import LinearFactory

MODEL_TYPES = ("phi3",)


def unsupported_reason(model: PreTrainedModel, positions: int) -> str | None:
    return llama.family_reason(model, positions, MODEL_TYPES)


def fused_projections(layer: Any, prefix: str, make: LinearFactory, dtype: torch.dtype) -> LlamaLayer:
    attn, mlp = layer.self_attn, layer.mlp
    return LlamaLayer(
        attn_norm=llama.layer_weight(layer.input_layernorm, dtype),
        qkv=make([prefix + "self_attn.qkv_proj"], [attn.qkv_proj]),
        out=make([prefix + "self_attn.o_proj"], [attn.o_proj]),
        mlp_norm=llama.layer_weight(layer.post_attention_layernorm, dtype),
        gate_up=make([prefix + "mlp.gate_up_proj"], [mlp.gate_up_proj]),
        down=make([prefix + "mlp.down_proj"], [mlp.down_proj]),
    )


def build(model: PreTrainedModel, make: LinearFactory, dtype: torch.dtype, positions: int) -> LlamaWeights:
    return llama.assemble(model, make, dtype, positions, fused_projections)
