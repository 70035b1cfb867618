"""Building blocks shared by the model modules: rotary embedding and attention over the slot cache.

Small pure functions over tensors. Shapes: N = tokens in this forward pass (one per row when
decoding, the prompts packed end to end when prefilling), B = rows, Hq / Hkv = query / KV heads,
G = Hq / Hkv, D = head size, L = live cache length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

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
    windowed: dict[int, torch.Tensor] = field(default_factory=dict)  # window -> bias, made on first use

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

    def bias_for(self, window: int) -> torch.Tensor:
        """The bias for a sliding-window layer (window > 0): each row attends to its last ``window``
        positions only (its new token included); 0 gives the plain bias."""
        if window <= 0 or self.live <= window:
            return self.bias
        found = self.windowed.get(window)
        if found is None:
            first = (self.positions + 1 - window).to(self.bias.device)  # [B]: the oldest position attended
            too_old = torch.arange(self.live, device=self.bias.device)[None, :] < first[:, None]  # [B, L]
            found = self.bias.masked_fill(too_old[:, None, None, :], float("-inf"))
            self.windowed[window] = found
        return found

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int = 0
    ) -> torch.Tensor:
        """q [B, Hq, D], k and v [B, Hkv, D] -> attention output [B, Hq * D]; window > 0: a sliding-window
        layer's (each token attends to the last ``window`` positions, itself included)."""
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
        bias = self.bias_for(window)
        out = F.scaled_dot_product_attention(grouped_q, k_live, v_live, attn_mask=bias, scale=self.scale)
        return out.reshape(batch, -1)  # [B, Hkv, G, D] -> [B, Hq * D]


@dataclass
class PrefillAttention:
    """Whole prompts, packed end to end; each is written to its (fresh) slot and attends causally."""

    cache: SlotKVCache
    segments: list[tuple[int, int, int]]  # (cache row, start in the packed tokens, length)
    scale: float

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int = 0
    ) -> torch.Tensor:
        """q [N, Hq, D], k and v [N, Hkv, D] -> attention output [N, Hq * D]; window > 0: each token
        attends to the last ``window`` positions of its prompt only (itself included)."""
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        outputs = []
        for row, start, length in self.segments:
            seg_k = k[start : start + length].transpose(0, 1)  # [Hkv, Lp, D]
            seg_v = v[start : start + length].transpose(0, 1)
            keys[row, :, :length] = seg_k
            values[row, :, :length] = seg_v
            seg_q = q[start : start + length].transpose(0, 1)  # [Hq, Lp, D]
            if 0 < window < length:
                out = F.scaled_dot_product_attention(
                    seg_q[None], seg_k[None], seg_v[None], attn_mask=sliding_mask(length, window, q.device),
                    scale=self.scale, enable_gqa=True,
                )  # [1, Hq, Lp, D]
            else:
                out = F.scaled_dot_product_attention(
                    seg_q[None], seg_k[None], seg_v[None], is_causal=True, scale=self.scale, enable_gqa=True
                )  # [1, Hq, Lp, D]
            outputs.append(out[0].transpose(0, 1).reshape(length, -1))
        return torch.cat(outputs)


def sliding_mask(length: int, window: int, device: torch.device) -> torch.Tensor:
    """[L, L] bool, True where query i attends key j: causal, and j among the last ``window`` (j > i - window)."""
    distance = torch.arange(length, device=device)[:, None] - torch.arange(length, device=device)[None, :]
    return (distance >= 0) & (distance < window)


@dataclass
class MixedAttention:
    """Decode rows first (``split`` of them), then packed prompts: one forward pass serves both."""

    decode: DecodeAttention | None
    prefill: PrefillAttention | None
    split: int

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int = 0
    ) -> torch.Tensor:
        """q [N, Hq, D], k and v [N, Hkv, D] -> attention output [N, Hq * D] (window: as the parts')."""
        if self.prefill is None:
            assert self.decode is not None
            return self.decode(layer, q, k, v, window)
        if self.decode is None:
            return self.prefill(layer, q, k, v, window)
        cut = self.split
        return torch.cat(
            [
                self.decode(layer, q[:cut], k[:cut], v[:cut], window),
                self.prefill(layer, q[cut:], k[cut:], v[cut:], window),
            ]
        )


Attention = DecodeAttention | PrefillAttention | MixedAttention
