"""The Llama family (Llama 2 and 3.x, SmolLM, Mistral with its sliding window) as a few pure functions, and
the decoder that the other rotary families build on (``qwen2.py``, ``qwen3.py``, ``phi3.py``: each maps its
checkpoint onto ``LlamaWeights`` and states what it cannot run).

Weights are taken from the loaded transformers model, with the query/key/value and gate/up
projections fused so each layer runs four matrix products. Shapes: N tokens, E hidden size,
Hq / Hkv heads, D head size, F intermediate size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedConfig, PreTrainedModel

from textgen.engine.core.fused import FusedKernels, Quantized, step_fits
from textgen.engine.core.kv_cache import PagedKVCache
from textgen.engine.core.layers import Attention, apply_rotary, rms_norm, rotary_tables
from textgen.engine.core.linear import Linear, W8A8Kernel
from textgen.engine.core.weights import LinearFactory

MODEL_TYPES = ("llama", "mistral")
# Rotary variants whose angles depend on the position alone (transformers computes them once); "dynamic"
# rescales with the sequence's length. "longrope" is static up to original_max_position_embeddings.
STATIC_ROPE = ("default", "linear", "llama3", "yarn", None)


@dataclass
class LlamaLayer:
    attn_norm: torch.Tensor  # [E]
    qkv: Linear  # E -> (Hq + 2 Hkv) D
    out: Linear  # Hq D -> E
    mlp_norm: torch.Tensor  # [E]
    gate_up: Linear  # E -> 2F
    down: Linear  # F -> E
    # Qwen3: RMSNorm of each query and key head before the rotary, else None: the weights per head
    # [Hq + Hkv, D] (the PyTorch path), and the query and key weights [D] (fused.c's attention applies them)
    qk_norm: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None


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
    window: int = 0  # one sliding window for every layer (Mistral, Phi-3-mini-4k): positions attended; 0 = all

    @property
    def scale(self) -> float:
        return math.pow(self.head_dim, -0.5)  # as head_dim**-0.5, typed


def unsupported_reason(model: PreTrainedModel, positions: int) -> str | None:
    """Why this module cannot run the model in slots of ``positions`` positions (None: it can)."""
    return family_reason(model, positions, MODEL_TYPES)


def family_reason(model: PreTrainedModel, positions: int, model_types: tuple[str, ...]) -> str | None:
    """unsupported_reason of a family that is this decoder as it is (llama, qwen2, qwen3, phi3): a model type
    of the family's, then what the decoder cannot do."""
    config = model.config
    if config.model_type not in model_types:
        return f"model type {config.model_type!r}"
    return decoder_reason(config, positions)


def decoder_reason(config: PreTrainedConfig, positions: int) -> str | None:
    """What the shared decoder cannot do (every family's check ends here): dynamic rotary angles, a
    window narrower than a slot on some layers only, MLP biases, another activation."""
    rope = rope_parameters(config)
    rope_type = rope.get("rope_type")
    if rope_type == "longrope":
        original = int(rope.get("original_max_position_embeddings") or config.max_position_embeddings)
        if positions > original:
            # transformers switches every position to the long factors once a sequence passes this length
            return (
                f"longrope beyond its original {original} positions (slots of {positions}: lower "
                "TEXTGEN_MAX_PROMPT_TOKENS + TEXTGEN_MAX_NEW_TOKENS_LIMIT to at most that)"
            )
    elif rope_type not in STATIC_ROPE:
        return f"rope type {rope_type!r}"
    if float(rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0) != 1.0:
        return "partial rotary embedding"
    window = sliding_window(config)
    if window is not None and window < positions and not every_layer_slides(config):
        # One window for every layer is an attention argument; a mix (Qwen2's max_window_layers) is not.
        return f"sliding-window attention on some layers only ({window} < {positions} positions per slot)"
    if getattr(config, "mlp_bias", False):
        return "MLP biases"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r}"
    return None


def rope_parameters(config: PreTrainedConfig) -> dict[str, Any]:
    found = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return dict(found)


def sliding_window(config: PreTrainedConfig) -> int | None:
    """The narrowest attention window any layer uses, None where every layer attends to all positions."""
    window = getattr(config, "sliding_window", None)
    if not window or not getattr(config, "use_sliding_window", True):
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None  # Qwen2/3: the window is configured, but no layer uses it
    return int(window)


def every_layer_slides(config: PreTrainedConfig) -> bool:
    layer_types = getattr(config, "layer_types", None)
    return layer_types is None or all(kind == "sliding_attention" for kind in layer_types)


def attention_window(config: PreTrainedConfig, positions: int) -> int:
    """The window every layer attends within (Mistral, Phi-3-mini-4k: the last ``sliding_window`` positions,
    the token's own included), or 0 where it never hides a position of a slot this long."""
    window = sliding_window(config)
    return window if window is not None and window < positions and every_layer_slides(config) else 0


LayerBuilder = Callable[[Any, str, LinearFactory, torch.dtype], LlamaLayer]


def build(model: PreTrainedModel, make: LinearFactory, dtype: torch.dtype, positions: int) -> LlamaWeights:
    return assemble(model, make, dtype, positions, separate_projections)


def separate_projections(layer: Any, prefix: str, make: LinearFactory, dtype: torch.dtype) -> LlamaLayer:
    """A layer with q/k/v and gate/up as separate linear modules (Llama, Mistral, Qwen2, Qwen3), fused here."""
    attn, mlp = layer.self_attn, layer.mlp
    return LlamaLayer(
        attn_norm=layer_weight(layer.input_layernorm, dtype),
        qkv=make(
            [prefix + "self_attn.q_proj", prefix + "self_attn.k_proj", prefix + "self_attn.v_proj"],
            [attn.q_proj, attn.k_proj, attn.v_proj],
        ),
        out=make([prefix + "self_attn.o_proj"], [attn.o_proj]),
        mlp_norm=layer_weight(layer.post_attention_layernorm, dtype),
        gate_up=make([prefix + "mlp.gate_proj", prefix + "mlp.up_proj"], [mlp.gate_proj, mlp.up_proj]),
        down=make([prefix + "mlp.down_proj"], [mlp.down_proj]),
    )


def assemble(
    model: PreTrainedModel, make: LinearFactory, dtype: torch.dtype, positions: int, layer_of: LayerBuilder
) -> LlamaWeights:
    """The decoder's weights: each layer as ``layer_of`` maps it, then the parts every family shares
    (embeddings, final norm, output layer, rotary tables)."""
    config = model.config
    base = model.model
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    layers = [layer_of(layer, f"model.layers.{index}.", make, dtype) for index, layer in enumerate(base.layers)]
    cos, sin = rope_tables(model, positions, dtype)
    return LlamaWeights(
        embed=base.embed_tokens.weight.detach().to(dtype),
        layers=layers,
        final_norm=base.norm.weight.detach().to(dtype),
        lm_head=make(["lm_head"], [model.lm_head], out_dtype=torch.float32),
        cos=cos.to(model.device),
        sin=sin.to(model.device),
        heads=heads,
        kv_heads=kv_heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        eps=float(config.rms_norm_eps),
        window=attention_window(config, positions),
    )


def rope_tables(model: PreTrainedModel, positions: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """cos, sin [positions, D] as transformers computes them for sequences up to ``positions`` long.

    Its rotary module holds the frequencies with any static scaling (linear, llama3, yarn) applied, and
    the factor that yarn and longrope multiply cos and sin by. For longrope these are the short factors
    (what transformers uses up to the original context; unsupported_reason refuses longer slots); its
    ``inv_freq`` holds the long ones once a longer sequence went through the transformers model."""
    rotary = model.model.rotary_emb
    short = rope_parameters(model.config).get("rope_type") == "longrope"
    inv_freq = rotary.original_inv_freq if short else rotary.inv_freq
    return rotary_tables(inv_freq, positions, float(getattr(rotary, "attention_scaling", 1.0)), dtype)


def layer_weight(module: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{type(module).__name__} has no weight tensor")
    return weight.detach().to(dtype)


def per_head_norms(
    q_norm: torch.nn.Module, k_norm: torch.nn.Module, heads: int, kv_heads: int, dtype: torch.dtype
) -> torch.Tensor:
    """The query and key norms' weights [D] repeated per head: [Hq + Hkv, D], one norm call for both."""
    q, k = layer_weight(q_norm, dtype), layer_weight(k_norm, dtype)
    return torch.cat([q.expand(heads, -1), k.expand(kv_heads, -1)])


def norm_heads(qkv: torch.Tensor, weight: torch.Tensor, heads: int, head_dim: int, eps: float) -> None:
    """RMSNorm of each query and key head of qkv [N, (Hq + 2 Hkv) D], in place; weight [Hq + Hkv, D] in
    qkv's dtype. As transformers computes it: normalised in float32, rounded to the model's dtype, then
    times the weight."""
    n = qkv.shape[0]
    qk = qkv[:, : heads * head_dim].view(n, heads, head_dim)  # heads here: Hq + Hkv
    normed = qk.float()
    normed = normed * torch.rsqrt(normed.pow(2).mean(-1, keepdim=True).add_(eps))
    qk.copy_(normed.to(qkv.dtype).mul_(weight))


def forward(w: LlamaWeights, tokens: torch.Tensor, positions: torch.Tensor, attention: Attention) -> torch.Tensor:
    """tokens, positions [N] -> final hidden states [N, E]."""
    n = tokens.shape[0]
    q_width, kv_width = w.heads * w.head_dim, w.kv_heads * w.head_dim
    x = F.embedding(tokens, w.embed)  # [N, E]
    cos, sin = w.cos[positions][:, None, :], w.sin[positions][:, None, :]  # [N, 1, D]
    for index, layer in enumerate(w.layers):
        h = rms_norm(x, layer.attn_norm, w.eps)
        qkv = layer.qkv(h)  # [N, (Hq + 2 Hkv) D]
        if layer.qk_norm is not None:
            norm_heads(qkv, layer.qk_norm, w.heads + w.kv_heads, w.head_dim, w.eps)
        qk = apply_rotary(qkv[:, : q_width + kv_width].view(n, w.heads + w.kv_heads, w.head_dim), cos, sin)
        v = qkv[:, q_width + kv_width :].view(n, w.kv_heads, w.head_dim)
        x = x + layer.out(attention(index, qk[:, : w.heads], qk[:, w.heads :], v, w.window))
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
    activated: torch.Tensor | None = None  # one for every layer: each layer's down projection reads it first
    delta = None
    for index, layer in enumerate(w.layers):
        fused.add_rms_norm(x, delta, layer.attn_norm, h, w.eps)
        qkv = layer.qkv(h)  # [B, (Hq + 2 Hkv) D]
        keys, values = cache.keys[index], cache.values[index]
        fused.rotary_cache_attention(
            qkv, w.cos, w.sin, positions, rows, keys, values, attended, w.heads, w.scale, tables, window=w.window,
            q_norm=layer.q_norm, k_norm=layer.k_norm, norm_eps=w.eps,
        )
        fused.add_rms_norm(x, layer.out(attended), layer.mlp_norm, h, w.eps)
        gate_up = layer.gate_up(h)  # [B, 2F]
        if activated is None or activated.shape[1] != gate_up.shape[1] // 2:
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
            qkv, w.cos, w.sin, positions, rows, keys, values, attended, w.heads, w.scale, tables, window=w.window,
            q_norm=layer.q_norm, k_norm=layer.k_norm, norm_eps=w.eps,
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
    mlp_width = w.layers[0].down.in_features  # within fused.c's width for silu_quantize
    return step_fits(w.embed, w.heads, w.kv_heads, w.head_dim, mlp_width, batch, live)
