"""Gemma 3 (text) as a few pure functions, beside the Llama family (llama.py).

What differs from Llama: the embeddings are scaled by sqrt(E); every RMSNorm multiplies by (1 + w); each
layer normalises the attention's and the MLP's outputs too (four norms a layer); the query and key heads are
RMS-normalised before their rotation; the MLP is GELU-tanh(gate) * up; attention scales by
query_pre_attn_scalar^-0.5; local layers attend to a sliding window of the last ``sliding_window`` positions
and global layers to everything, each kind with its own rotary base (and scaling). The KV cache keeps every
position for every layer (the window is a mask): simple, and the same slot layout as the other modules.

Norm weights are stored as 1 + w, in float32 for the PyTorch path (which normalises in float32, as
transformers does) and rounded to bf16 for fused.c. Shapes: N tokens, E hidden size, Hq / Hkv heads, D head
size, F intermediate size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from textgen.engine.core.fused import FusedKernels, step_fits
from textgen.engine.core.kv_cache import PagedKVCache
from textgen.engine.core.layers import Attention, apply_rotary, rotary_tables
from textgen.engine.core.linear import Linear
from textgen.engine.core.weights import LinearFactory

MODEL_TYPES = ("gemma3_text",)
LAYER_TYPES = ("sliding_attention", "full_attention")
STATIC_ROPE = ("default", "linear", "llama3", None)
ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_tanh")


@dataclass
class Gemma3Norms:
    """A layer's norm weights, each already 1 + w."""

    attn: torch.Tensor  # [E], before attention
    post_attn: torch.Tensor  # [E], on the attention's output
    mlp: torch.Tensor  # [E], before the MLP
    post_mlp: torch.Tensor  # [E], on the MLP's output
    q: torch.Tensor  # [D], each query head
    k: torch.Tensor  # [D], each key head

    def to(self, dtype: torch.dtype) -> Gemma3Norms:
        return Gemma3Norms(*(t.to(dtype) for t in (self.attn, self.post_attn, self.mlp, self.post_mlp, self.q, self.k)))


@dataclass
class Gemma3Layer:
    norms: Gemma3Norms  # float32, for the PyTorch path
    fused_norms: Gemma3Norms  # bf16, for fused.c
    qkv: Linear  # E -> (Hq + 2 Hkv) D
    out: Linear  # Hq D -> E
    gate_up: Linear  # E -> 2F
    down: Linear  # F -> E
    window: int  # positions attended by a local layer; 0 for a global one
    cos: torch.Tensor  # [P, D], this layer kind's rotary table
    sin: torch.Tensor  # [P, D]


@dataclass
class Gemma3Weights:
    embed: torch.Tensor  # [V, E]
    embed_scale: torch.Tensor  # sqrt(E) in the compute dtype (as transformers rounds it)
    layers: list[Gemma3Layer]
    final_norm: torch.Tensor  # [E] float32, 1 + w
    fused_final_norm: torch.Tensor  # [E] bf16
    lm_head: Linear  # E -> V
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    scale: float  # query_pre_attn_scalar^-0.5


def unsupported_reason(model: PreTrainedModel) -> str | None:
    config = model.config
    if config.model_type not in MODEL_TYPES:
        return f"model type {config.model_type!r}"
    for option in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(config, option, None):
            return f"{option} ({getattr(config, option)})"
    if getattr(config, "use_bidirectional_attention", False):
        return "bidirectional attention"
    if getattr(config, "attention_bias", False):
        return "attention biases"
    if getattr(config, "hidden_activation", None) not in ACTIVATIONS:
        return f"activation {getattr(config, 'hidden_activation', None)!r}"
    unknown = set(config.layer_types) - set(LAYER_TYPES)
    if unknown:
        return f"layer types {sorted(unknown)}"
    rope = getattr(config, "rope_parameters", None) or {}
    for layer_type in set(config.layer_types):
        rope_type = (rope.get(layer_type) or {}).get("rope_type")
        if rope_type not in STATIC_ROPE:
            return f"rope type {rope_type!r} ({layer_type})"
    return None


def build(model: PreTrainedModel, make: LinearFactory, dtype: torch.dtype, positions: int) -> Gemma3Weights:
    config = model.config
    base = model.model
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    tables = {
        kind: _rotary_table(base.rotary_emb, kind, positions, dtype, model.device) for kind in set(config.layer_types)
    }
    layers = []
    for index, layer in enumerate(base.layers):
        prefix = f"model.layers.{index}."
        attn, mlp = layer.self_attn, layer.mlp
        kind = config.layer_types[index]
        norms = Gemma3Norms(
            *(
                _one_plus(norm)
                for norm in (
                    layer.input_layernorm,
                    layer.post_attention_layernorm,
                    layer.pre_feedforward_layernorm,
                    layer.post_feedforward_layernorm,
                    attn.q_norm,
                    attn.k_norm,
                )
            )
        )
        layers.append(
            Gemma3Layer(
                norms=norms,
                fused_norms=norms.to(torch.bfloat16),
                qkv=make(
                    [prefix + "self_attn.q_proj", prefix + "self_attn.k_proj", prefix + "self_attn.v_proj"],
                    [attn.q_proj, attn.k_proj, attn.v_proj],
                ),
                out=make([prefix + "self_attn.o_proj"], [attn.o_proj]),
                gate_up=make([prefix + "mlp.gate_proj", prefix + "mlp.up_proj"], [mlp.gate_proj, mlp.up_proj]),
                down=make([prefix + "mlp.down_proj"], [mlp.down_proj]),
                window=int(config.sliding_window) if kind == "sliding_attention" else 0,
                cos=tables[kind][0],
                sin=tables[kind][1],
            )
        )
    final_norm = _one_plus(base.norm)
    return Gemma3Weights(
        embed=base.embed_tokens.weight.detach().to(dtype),
        embed_scale=torch.tensor(float(config.hidden_size) ** 0.5, dtype=dtype, device=model.device),
        layers=layers,
        final_norm=final_norm,
        fused_final_norm=final_norm.to(torch.bfloat16),
        lm_head=make(["lm_head"], [model.lm_head], out_dtype=torch.float32),
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        eps=float(config.rms_norm_eps),
        scale=float(config.query_pre_attn_scalar) ** -0.5,
    )


def _one_plus(norm: torch.nn.Module) -> torch.Tensor:
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{type(norm).__name__} has no weight")
    return 1.0 + weight.detach().float()


def _rotary_table(
    rotary: torch.nn.Module, kind: str, positions: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [P, D] of one layer kind, from the inverse frequencies transformers computed for it (so its
    base and any static scaling are transformers' own)."""
    inv_freq = getattr(rotary, f"{kind}_inv_freq")
    scaling = float(getattr(rotary, f"{kind}_attention_scaling", 1.0))
    cos, sin = rotary_tables(inv_freq, positions, scaling, dtype)
    return cos.to(device), sin.to(device)


def norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm: x [..., K] normalised in float32, times weight [K] (1 + w, float32), in x's dtype."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * weight).to(x.dtype)


def forward(w: Gemma3Weights, tokens: torch.Tensor, positions: torch.Tensor, attention: Attention) -> torch.Tensor:
    """tokens, positions [N] -> final hidden states [N, E]."""
    n = tokens.shape[0]
    q_width, kv_width = w.heads * w.head_dim, w.kv_heads * w.head_dim
    x = F.embedding(tokens, w.embed) * w.embed_scale  # [N, E]
    for index, layer in enumerate(w.layers):
        cos, sin = layer.cos[positions][:, None, :], layer.sin[positions][:, None, :]  # [N, 1, D]
        qkv = layer.qkv(norm(x, layer.norms.attn, w.eps))  # [N, (Hq + 2 Hkv) D]
        q = norm(qkv[:, :q_width].view(n, w.heads, w.head_dim), layer.norms.q, w.eps)
        k = norm(qkv[:, q_width : q_width + kv_width].view(n, w.kv_heads, w.head_dim), layer.norms.k, w.eps)
        v = qkv[:, q_width + kv_width :].view(n, w.kv_heads, w.head_dim)
        attended = attention(index, apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v, layer.window)
        x = x + norm(layer.out(attended), layer.norms.post_attn, w.eps)
        gate, up = layer.gate_up(norm(x, layer.norms.mlp, w.eps)).chunk(2, dim=-1)  # [N, F] each
        x = x + norm(layer.down(F.gelu(gate, approximate="tanh") * up), layer.norms.post_mlp, w.eps)
    return norm(x, w.final_norm, w.eps)


def step_fused(
    w: Gemma3Weights,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    rows: torch.Tensor,
    cache: PagedKVCache,
    fused: FusedKernels,
    tables: torch.Tensor | None = None,
) -> torch.Tensor:
    """``forward`` for N tokens, each at its own position of its own sequence (rows index ``tables``, the
    cache's block tables), in bfloat16, with the work
    between matrix products done by fused.c (the layout of llama.step_fused: decode rows and whole prompts in
    one pass): per layer four products, the q/k norms, rotation, cache write and windowed attention in one
    call, five norm calls (two of them with the residual add) and one for GELU-tanh(gate) * up.
    -> final hidden states [N, E]."""
    x = F.embedding(tokens, w.embed)  # [N, E], the residual stream, updated in place
    x.mul_(w.embed_scale)
    batch = x.shape[0]
    h, normed = torch.empty_like(x), torch.empty_like(x)
    attended = x.new_empty(batch, w.heads * w.head_dim)
    delta: torch.Tensor | None = None  # the last layer's normalised MLP output, added at the next norm
    for index, layer in enumerate(w.layers):
        norms = layer.fused_norms
        fused.add_rms_norm(x, delta, norms.attn, h, w.eps)
        qkv = layer.qkv(h)  # [N, (Hq + 2 Hkv) D]
        fused.rotary_cache_attention(
            qkv, layer.cos, layer.sin, positions, rows, cache.keys[index], cache.values[index], attended, w.heads,
            w.scale, tables, window=layer.window, q_norm=norms.q, k_norm=norms.k, norm_eps=w.eps,
        )
        fused.add_rms_norm(layer.out(attended), None, norms.post_attn, normed, w.eps)
        fused.add_rms_norm(x, normed, norms.mlp, h, w.eps)
        gate_up = layer.gate_up(h)  # [N, 2F]
        activated = x.new_empty(batch, gate_up.shape[1] // 2)
        fused.gelu_tanh_mul(gate_up, activated)
        delta = torch.empty_like(x)
        fused.add_rms_norm(layer.down(activated), None, norms.post_mlp, delta, w.eps)
    out = torch.empty_like(x)
    fused.add_rms_norm(x, delta, w.fused_final_norm, out, w.eps)
    return out


def fused_supported(w: Gemma3Weights, batch: int, live: int) -> bool:
    """step_fused's preconditions: bf16 weights on a CPU, bf16 products, shapes within fused.c's limits."""
    first = w.layers[0]
    return step_fits(w.embed, w.heads, w.kv_heads, w.head_dim, first.down.in_features, batch, live) and all(
        linear.out_dtype == torch.bfloat16 for linear in (first.qkv, first.out, first.gate_up, first.down)
    )
