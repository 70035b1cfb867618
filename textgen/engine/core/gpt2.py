"""GPT-2 as a few pure functions: learned positions, LayerNorm, fused QKV, GELU (tanh) MLP.

transformers stores GPT-2's projections as Conv1D ([in, out]); the factory receives them transposed
to the usual [out, in]. Shapes: N tokens, E hidden size, H heads, D head size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from textgen.engine.core.layers import Attention
from textgen.engine.core.linear import Linear
from textgen.engine.core.weights import LinearFactory, Projection

MODEL_TYPES = ("gpt2",)


@dataclass
class Gpt2Layer:
    ln1: tuple[torch.Tensor, torch.Tensor]  # weight, bias [E]
    qkv: Linear  # E -> 3E
    out: Linear  # E -> E
    ln2: tuple[torch.Tensor, torch.Tensor]
    up: Linear  # E -> 4E
    down: Linear  # 4E -> E


@dataclass
class Gpt2Weights:
    embed: torch.Tensor  # [V, E]
    positions: torch.Tensor  # [P, E]
    layers: list[Gpt2Layer]
    final_norm: tuple[torch.Tensor, torch.Tensor]
    lm_head: Linear
    heads: int
    head_dim: int
    eps: float

    @property
    def kv_heads(self) -> int:
        return self.heads

    @property
    def scale(self) -> float:
        return math.pow(self.head_dim, -0.5)  # as head_dim**-0.5, typed


def unsupported_reason(model: PreTrainedModel, positions: int) -> str | None:
    config = model.config
    if config.model_type not in MODEL_TYPES:
        return f"model type {config.model_type!r}"
    if getattr(config, "scale_attn_by_inverse_layer_idx", False) or not getattr(config, "scale_attn_weights", True):
        return "non-default attention scaling"
    if getattr(config, "activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        return f"activation {config.activation_function!r}"
    return None


def _tensors(module: torch.nn.Module, path: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight and bias (None where it has none) of the submodule at path, detached."""
    layer = module.get_submodule(path)
    weight, bias = getattr(layer, "weight", None), getattr(layer, "bias", None)
    if not isinstance(weight, torch.Tensor) or not (bias is None or isinstance(bias, torch.Tensor)):
        raise TypeError(f"{path} ({type(layer).__name__}) has no weight tensor")
    return weight.detach(), None if bias is None else bias.detach()


def _conv(module: torch.nn.Module, path: str) -> Projection:
    """A Conv1D ([in, out] weight) seen as a linear layer ([out, in])."""
    weight, bias = _tensors(module, path)
    return Projection(weight.t(), bias)


def _norm(module: torch.nn.Module, path: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    weight, bias = _tensors(module, path)
    if bias is None:
        raise TypeError(f"{path}: GPT-2's LayerNorm has a bias")
    return weight.to(dtype), bias.to(dtype)


def build(model: PreTrainedModel, make: LinearFactory, dtype: torch.dtype, positions: int) -> Gpt2Weights:
    config = model.config
    base = model.get_submodule("transformer")
    blocks = base.get_submodule("h")
    layers = [
        Gpt2Layer(
            ln1=_norm(block, "ln_1", dtype),
            qkv=make([f"h.{i}.attn.c_attn"], [_conv(block, "attn.c_attn")]),
            out=make([f"h.{i}.attn.c_proj"], [_conv(block, "attn.c_proj")]),
            ln2=_norm(block, "ln_2", dtype),
            up=make([f"h.{i}.mlp.c_fc"], [_conv(block, "mlp.c_fc")]),
            down=make([f"h.{i}.mlp.c_proj"], [_conv(block, "mlp.c_proj")]),
        )
        for i, block in enumerate(blocks.children())
    ]
    return Gpt2Weights(
        embed=_tensors(base, "wte")[0].to(dtype),
        positions=_tensors(base, "wpe")[0].to(dtype)[:positions],
        layers=layers,
        final_norm=_norm(base, "ln_f", dtype),
        lm_head=make(["lm_head"], [model.lm_head], out_dtype=torch.float32),
        heads=config.n_head,
        head_dim=config.n_embd // config.n_head,
        eps=float(config.layer_norm_epsilon),
    )


def forward(w: Gpt2Weights, tokens: torch.Tensor, positions: torch.Tensor, attention: Attention) -> torch.Tensor:
    """tokens, positions [N] -> final hidden states [N, E]."""
    n, hidden = tokens.shape[0], w.embed.shape[1]
    x = F.embedding(tokens, w.embed) + F.embedding(positions, w.positions)  # [N, E]
    for index, layer in enumerate(w.layers):
        h = F.layer_norm(x, (hidden,), *layer.ln1, w.eps)
        q, k, v = layer.qkv(h).view(n, 3, w.heads, w.head_dim).unbind(1)  # [N, H, D] each
        x = x + layer.out(attention(index, q, k, v))
        h = F.layer_norm(x, (hidden,), *layer.ln2, w.eps)
        x = x + layer.down(F.gelu(layer.up(h), approximate="tanh"))
    return F.layer_norm(x, (hidden,), *w.final_norm, w.eps)
