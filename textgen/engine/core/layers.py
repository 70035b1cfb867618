"""Building blocks shared by the model modules: rotary embedding and attention over the slot cache.

Small pure functions over tensors. Shapes: N = tokens in this forward pass (one per row when
decoding, the prompts packed end to end when prefilling), B = rows, Hq / Hkv = query / KV heads,
G = Hq / Hkv, D = head size, L = live cache length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from textgen.engine.core.kv_cache import SlotKVCache


def rotary_tables(
    inv_freq: torch.Tensor, positions: int, scaling: float, dtype: torch.dtype
) -> tuple[torch.Tensor, ...]:
    """cos, sin [positions, D] for the split-half rotary layout (as transformers' Llama uses)."""
    angles = torch.outer(torch.arange(positions, dtype=torch.float32), inv_freq.float().cpu())  # [P, D/2]
    angles = torch.cat([angles, angles], dim=-1)  # [P, D]
    return (angles.cos() * scaling).to(dtype), (angles.sin() * scaling).to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [N, E] scaled to unit root-mean-square, times weight [E]; computed in x's dtype (fewer ops than
    ``F.rms_norm``, which converts to float32 and back on CPU)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(eps)) * weight


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, H, D]; cos, sin [N, 1, D] -> x rotated by each token's position."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


@dataclass
class DecodeAttention:
    """One new token per row, attending over that row's cached positions plus itself."""

    cache: SlotKVCache
    rows: torch.Tensor  # [B] long, dense cache rows
    positions: torch.Tensor  # [B] long, where each row's new key/value is written
    live: int  # longest row's length after this step
    bias: torch.Tensor  # [B, 1, 1, L]: 0 where a position is attended, -inf past a row's length
    dense: bool  # rows are exactly 0..B-1, so the cache is read as a view
    scale: float

    @classmethod
    def plan(cls, cache: SlotKVCache, rows: Sequence[int], lengths: Sequence[int], scale: float) -> DecodeAttention:
        device = cache.device
        live = max(lengths) + 1
        cache.ensure_initialised(live)
        lengths_t = torch.tensor(lengths, dtype=torch.long)
        attended = torch.arange(live)[None, :] <= lengths_t[:, None]  # [B, L]
        bias = torch.zeros(attended.shape, dtype=cache.keys[0].dtype).masked_fill_(~attended, float("-inf"))
        return cls(
            cache=cache,
            rows=torch.tensor(rows, dtype=torch.long, device=device),
            positions=lengths_t.to(device),
            live=live,
            bias=bias.to(device)[:, None, None, :],
            dense=list(rows) == list(range(len(rows))),
            scale=scale,
        )

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [B, Hq, D], k and v [B, Hkv, D] -> attention output [B, Hq * D]."""
        keys, values = self.cache.keys[layer], self.cache.values[layer]  # [S, Hkv, T, D]
        keys[self.rows, :, self.positions] = k
        values[self.rows, :, self.positions] = v
        if self.dense:
            k_live, v_live = keys[: len(self.rows), :, : self.live], values[: len(self.rows), :, : self.live]
        else:
            k_live, v_live = keys[self.rows, :, : self.live], values[self.rows, :, : self.live]  # [B, Hkv, L, D]
        batch, kv_heads = k.shape[0], k.shape[1]
        # The G query heads that share a KV head act as G query positions of one attention call.
        grouped_q = q.view(batch, kv_heads, -1, q.shape[-1])  # [B, Hkv, G, D]
        out = F.scaled_dot_product_attention(grouped_q, k_live, v_live, attn_mask=self.bias, scale=self.scale)
        return out.reshape(batch, -1)  # [B, Hkv, G, D] -> [B, Hq * D]


@dataclass
class PrefillAttention:
    """Prompts (or the rest of one), packed end to end; each is written to its slot from its offset and
    attends causally over everything before it in the slot (the cached prefix) and itself."""

    cache: SlotKVCache
    # (cache row, start in the packed tokens, length, first position in the slot); a 3-tuple starts at 0.
    segments: Sequence[tuple[int, ...]]
    scale: float

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [N, Hq, D], k and v [N, Hkv, D] -> attention output [N, Hq * D]."""
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        outputs = []
        for row, start, length, *rest in self.segments:
            offset = rest[0] if rest else 0
            seg_k = k[start : start + length].transpose(0, 1)  # [Hkv, Lp, D]
            seg_v = v[start : start + length].transpose(0, 1)
            keys[row, :, offset : offset + length] = seg_k
            values[row, :, offset : offset + length] = seg_v
            seg_q = q[start : start + length].transpose(0, 1)  # [Hq, Lp, D]
            if offset:
                # Query i sits at position offset + i and sees every position up to its own.
                live = offset + length
                attended = torch.arange(live, device=q.device)[None, :] <= torch.arange(
                    offset, live, device=q.device
                )[:, None]  # [Lp, live]
                out = F.scaled_dot_product_attention(
                    seg_q[None], keys[row, :, :live][None], values[row, :, :live][None],
                    attn_mask=attended, scale=self.scale, enable_gqa=True,
                )
            else:
                out = F.scaled_dot_product_attention(
                    seg_q[None], seg_k[None], seg_v[None], is_causal=True, scale=self.scale, enable_gqa=True
                )  # [1, Hq, Lp, D]
            outputs.append(out[0].transpose(0, 1).reshape(length, -1))
        return torch.cat(outputs)


@dataclass
class MixedAttention:
    """Decode rows first (``split`` of them), then packed prompts: one forward pass serves both."""

    decode: DecodeAttention | None
    prefill: PrefillAttention | None
    split: int

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [N, Hq, D], k and v [N, Hkv, D] -> attention output [N, Hq * D]."""
        if self.prefill is None:
            assert self.decode is not None
            return self.decode(layer, q, k, v)
        if self.decode is None:
            return self.prefill(layer, q, k, v)
        cut = self.split
        return torch.cat(
            [self.decode(layer, q[:cut], k[:cut], v[:cut]), self.prefill(layer, q[cut:], k[cut:], v[cut:])]
        )


Attention = DecodeAttention | PrefillAttention | MixedAttention
