"""The Llama family (Llama, SmolLM2, Mistral and Qwen2 style checkpoints) as a few pure functions.

Weights are taken from the loaded transformers model, with the query/key/value and gate/up
projections fused so each layer runs four matrix products. Shapes: N tokens, E hidden size,
Hq / Hkv heads, D head size, F intermediate size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

import textgen.engine.core.fused as fused_limits
from textgen.engine.core.fused import FusedKernels, Quantized
from textgen.engine.core.kv_cache import PagedKVCache
from textgen.engine.core.layers import Attention, apply_rotary, rms_norm, rotary_tables
from textgen.engine.core.linear import Linear, W8A8Kernel
from textgen.engine.core.weights import LinearFactory

MODEL_TYPES = ("llama", "mistral", "qwen2")
STATIC_ROPE = ("default", "linear", "llama3", None)


@dataclass
class LlamaLayer:
    attn_norm: torch.Tensor  # [E]
    qkv: Linear  # E -> (Hq + 2 Hkv) D
    out: Linear  # Hq D -> E
    mlp_norm: torch.Tensor  # [E]
    gate_up: Linear  # E -> 2F
    down: Linear  # F -> E


@dataclass
class LlamaWeights:
    embed: torch.Tensor  # [V, E]
    layers: list[LlamaLayer]
    final_norm: torch.Tensor  # [E]
    lm_head: Linear  # E -> V
    cos: torch.Tensor  # [P, D]
    sin: torch.Tensor  # [P, D]
    heads: int
    kv_heads: int
    head_dim: int
    eps: float

    @property
    def scale(self) -> float:
        return math.pow(self.head_dim, -0.5)  # as head_dim**-0.5, typed


def unsupported_reason(model: PreTrainedModel) -> str | None:
    config = model.config
    if config.model_type not in MODEL_TYPES:
        return f"model type {config.model_type!r}"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type") not in STATIC_ROPE:
        return f"rope type {rope.get('rope_type')!r}"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        window = int(config.sliding_window)
        if window < config.max_position_embeddings:
            return f"sliding-window attention ({window})"
    if getattr(config, "mlp_bias", False):
        return "MLP biases"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r}"
    return None


def build(model: PreTrainedModel, make: LinearFactory, dtype: torch.dtype, positions: int) -> LlamaWeights:
    config = model.config
    base = model.model
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    layers = []
    for index, layer in enumerate(base.layers):
        prefix = f"model.layers.{index}."
        attn, mlp = layer.self_attn, layer.mlp
        layers.append(
            LlamaLayer(
                attn_norm=layer.input_layernorm.weight.detach().to(dtype),
                qkv=make(
                    [prefix + "self_attn.q_proj", prefix + "self_attn.k_proj", prefix + "self_attn.v_proj"],
                    [attn.q_proj, attn.k_proj, attn.v_proj],
                ),
                out=make([prefix + "self_attn.o_proj"], [attn.o_proj]),
                mlp_norm=layer.post_attention_layernorm.weight.detach().to(dtype),
                gate_up=make([prefix + "mlp.gate_proj", prefix + "mlp.up_proj"], [mlp.gate_proj, mlp.up_proj]),
                down=make([prefix + "mlp.down_proj"], [mlp.down_proj]),
            )
        )
    rotary = base.rotary_emb
    cos, sin = rotary_tables(rotary.inv_freq, positions, float(getattr(rotary, "attention_scaling", 1.0)), dtype)
    return LlamaWeights(
        embed=base.embed_tokens.weight.detach().to(dtype),
        layers=layers,
        final_norm=base.norm.weight.detach().to(dtype),
        lm_head=make(["lm_head"], [model.lm_head], out_dtype=torch.float32),
        cos=cos.to(model.device),
        sin=sin.to(model.device),
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        eps=float(config.rms_norm_eps),
    )


def forward(w: LlamaWeights, tokens: torch.Tensor, positions: torch.Tensor, attention: Attention) -> torch.Tensor:
    """tokens, positions [N] -> final hidden states [N, E]."""
    n = tokens.shape[0]
    q_width, kv_width = w.heads * w.head_dim, w.kv_heads * w.head_dim
    x = F.embedding(tokens, w.embed)  # [N, E]
    cos, sin = w.cos[positions][:, None, :], w.sin[positions][:, None, :]  # [N, 1, D]
    for index, layer in enumerate(w.layers):
        h = rms_norm(x, layer.attn_norm, w.eps)
        qkv = layer.qkv(h)  # [N, (Hq + 2 Hkv) D]
        qk = apply_rotary(qkv[:, : q_width + kv_width].view(n, w.heads + w.kv_heads, w.head_dim), cos, sin)
        v = qkv[:, q_width + kv_width :].view(n, w.kv_heads, w.head_dim)
        x = x + layer.out(attention(index, qk[:, : w.heads], qk[:, w.heads :], v))
        h = rms_norm(x, layer.mlp_norm, w.eps)
        gate, up = layer.gate_up(h).chunk(2, dim=-1)  # [N, F] each
        x = x + layer.down(F.silu(gate) * up)
    return rms_norm(x, w.final_norm, w.eps)


def step_fused(
    w: LlamaWeights,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    rows: torch.Tensor,
    cache: PagedKVCache,
    fused: FusedKernels,
    tables: torch.Tensor | None = None,
) -> torch.Tensor:
    """``forward`` for N tokens, each at its own position of its own cache row (tokens, positions, cache
    rows [N]: one per decoding sequence, and every token of the prompts being prefilled), in bfloat16,
    with the work between matrix products done by ``fused.c``: four products and four calls per layer
    instead of ~35 operators (six calls with w8a8 products, whose quantizing and rescaling they absorb).
    Writes each token's key/value at its position; rows index ``tables`` [R, W], the block tables of the
    paged cache. -> final hidden states [N, E]."""
    x = F.embedding(tokens, w.embed)  # [N, E], the residual stream, updated in place
    first = w.layers[0]
    if all(_fused_w8a8(linear.kernel_for(len(tokens))) for linear in (first.qkv, first.out, first.gate_up, first.down)):
        return _step_w8a8(w, x, positions, rows, cache, fused, tables)
    return _step_float(w, x, positions, rows, cache, fused, tables)


def _step_float(
    w: LlamaWeights, x: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor, cache: PagedKVCache,
    fused: FusedKernels, tables: torch.Tensor | None,
) -> torch.Tensor:
    """step_fused with products that take and return bf16 (int4, bf16 weights)."""
    h = torch.empty_like(x)
    attended = x.new_empty(x.shape[0], w.heads * w.head_dim)
    delta = None
    for index, layer in enumerate(w.layers):
        fused.add_rms_norm(x, delta, layer.attn_norm, h, w.eps)
        qkv = layer.qkv(h)  # [B, (Hq + 2 Hkv) D]
        keys, values = cache.keys[index], cache.values[index]
        fused.rotary_cache_attention(
            qkv, w.cos, w.sin, positions, rows, keys, values, attended, w.heads, w.scale, tables
        )
        fused.add_rms_norm(x, layer.out(attended), layer.mlp_norm, h, w.eps)
        gate_up = layer.gate_up(h)  # [B, 2F]
        activated = x.new_empty(x.shape[0], gate_up.shape[1] // 2)
        fused.silu_mul(gate_up, activated)
        delta = layer.down(activated)
    out = torch.empty_like(x)
    fused.add_rms_norm(x, delta, w.final_norm, out, w.eps)
    return out


def _step_w8a8(
    w: LlamaWeights, x: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor, cache: PagedKVCache,
    fused: FusedKernels, tables: torch.Tensor | None,
) -> torch.Tensor:
    """step_fused with w8a8 products: fused.c quantizes each product's input as it computes it (norm,
    SiLU) and rescales its int32 result where it is consumed (residual, SiLU), so only the attention's
    input and output pass through bf16."""
    batch = x.shape[0]
    attended = x.new_empty(batch, w.heads * w.head_dim)
    pending: tuple[torch.Tensor, Quantized, W8A8Kernel] | None = None  # the last down projection's result
    for index, layer in enumerate(w.layers):
        qkv_k, out_k, gate_up_k, down_k = (
            _as_w8a8(linear.kernel_for(batch)) for linear in (layer.qkv, layer.out, layer.gate_up, layer.down)
        )
        into_qkv = fused.residual_norm_quantize(x, pending, layer.attn_norm, w.eps, qkv_k)
        assert into_qkv is not None
        qkv = qkv_k.rescale(qkv_k.product(into_qkv), into_qkv, torch.bfloat16)  # [N, (Hq + 2 Hkv) D]
        keys, values = cache.keys[index], cache.values[index]
        fused.rotary_cache_attention(
            qkv, w.cos, w.sin, positions, rows, keys, values, attended, w.heads, w.scale, tables
        )
        into_out = fused.quantize_rows(attended, out_k.outliers)
        into_gate_up = fused.residual_norm_quantize(
            x, (out_k.product(into_out), into_out, out_k), layer.mlp_norm, w.eps, gate_up_k
        )
        assert into_gate_up is not None
        into_down = fused.silu_quantize(gate_up_k.product(into_gate_up), into_gate_up, gate_up_k, down_k)
        pending = (down_k.product(into_down), into_down, down_k)
    out = torch.empty_like(x)
    fused.residual_norm_quantize(x, pending, w.final_norm, w.eps, None, out)
    return out


def _fused_w8a8(kernel: object) -> bool:
    return isinstance(kernel, W8A8Kernel) and kernel.fused is not None


def _as_w8a8(kernel: object) -> W8A8Kernel:
    assert isinstance(kernel, W8A8Kernel)
    return kernel


def fused_supported(w: LlamaWeights, batch: int, live: int) -> bool:
    """step_fused's preconditions: bf16 weights on a CPU and shapes within fused.c's limits. Any batch:
    fused.c shares its loops over rows with PyTorch's threads, and at every batch size it beats the ~35
    operators it replaces (batch 64: 56 vs 66 ms per step, measured with bench.core_rate)."""
    return (
        batch > 0
        and w.embed.dtype == torch.bfloat16
        and w.embed.device.type == "cpu"
        and live <= fused_limits.MAX_LIVE
        and w.heads <= fused_limits.MAX_HEADS
        and w.heads // w.kv_heads <= fused_limits.MAX_GROUP
        and w.head_dim <= fused_limits.MAX_DIM
        and w.embed.shape[1] <= fused_limits.MAX_WIDTH
        and w.layers[0].down.in_features <= fused_limits.MAX_WIDTH  # the MLP's width, for silu_quantize
    )
