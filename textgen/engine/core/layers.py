"""Building blocks shared by the model modules: rotary embedding and attention over the paged KV cache.

Small pure functions over tensors. Shapes: N = tokens in this forward pass (one per row when
decoding, the prompts packed end to end when prefilling), B = rows, Hq / Hkv = query / KV heads,
G = Hq / Hkv, D = head size, L = live cache length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from textgen.engine.core.kv_cache import PagedKVCache


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
    """One new token per sequence, attending over that sequence's cached positions plus itself; the cache
    is read through each sequence's block table."""

    cache: PagedKVCache
    tables: torch.Tensor  # [B, W] long, block ids of each sequence
    blocks: torch.Tensor  # [B] long, the block each new key/value is written to
    offsets: torch.Tensor  # [B] long, its offset in that block
    live: int  # longest sequence's length after this step
    bias: torch.Tensor  # [B, 1, 1, L]: 0 where a position is attended, -inf past a sequence's length
    scale: float

    @classmethod
    def plan(
        cls, cache: PagedKVCache, slots: Sequence[int], lengths: Sequence[int], scale: float
    ) -> DecodeAttention:
        device, size = cache.device, cache.block_size
        live = max(lengths) + 1
        tables = cache.tables_of(slots)  # [B, W]
        lengths_t = torch.tensor(lengths, dtype=torch.long)
        blocks = tables.gather(1, (lengths_t // size)[:, None])[:, 0]
        attended = torch.arange(live)[None, :] <= lengths_t[:, None]  # [B, L]
        bias = torch.zeros(attended.shape, dtype=cache.keys[0].dtype).masked_fill_(~attended, float("-inf"))
        return cls(
            cache=cache,
            tables=tables.to(device),
            blocks=blocks.to(device),
            offsets=(lengths_t % size).to(device),
            live=live,
            bias=bias.to(device)[:, None, None, :],
            scale=scale,
        )

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [B, Hq, D], k and v [B, Hkv, D] -> attention output [B, Hq * D]."""
        keys, values = self.cache.keys[layer], self.cache.values[layer]  # [NB, Hkv, BS, D]
        keys[self.blocks, :, self.offsets] = k
        values[self.blocks, :, self.offsets] = v
        k_live, v_live = _gather(keys, self.tables, self.live), _gather(values, self.tables, self.live)
        batch, kv_heads = k.shape[0], k.shape[1]
        # The G query heads that share a KV head act as G query positions of one attention call.
        grouped_q = q.view(batch, kv_heads, -1, q.shape[-1])  # [B, Hkv, G, D]
        out = F.scaled_dot_product_attention(grouped_q, k_live, v_live, attn_mask=self.bias, scale=self.scale)
        return out.reshape(batch, -1)  # [B, Hkv, G, D] -> [B, Hq * D]


def _gather(cache: torch.Tensor, tables: torch.Tensor, live: int) -> torch.Tensor:
    """cache [NB, H, BS, D] read through tables [B, W] -> [B, H, live, D], each sequence's positions in order."""
    batch = tables.shape[0]
    _, heads, size, dim = cache.shape
    blocks = cache[tables[:, : -(-live // size)]]  # [B, W', H, BS, D]
    return blocks.transpose(1, 2).reshape(batch, heads, -1, dim)[:, :, :live]


@dataclass
class PrefillAttention:
    """Prompts, packed end to end; each is written to its sequence's blocks and attends causally, over the
    positions its sequence already holds (a prompt that continues a cached prefix) and its own."""

    cache: PagedKVCache
    segments: list[tuple[int, int, int, int]]  # (sequence, start in the packed tokens, length, first position)
    scale: float

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [N, Hq, D], k and v [N, Hkv, D] -> attention output [N, Hq * D]."""
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        outputs = []
        for slot, start, length, first in self.segments:
            blocks, offsets = self.cache.positions_in_blocks(slot, first, first + length)
            keys[blocks, :, offsets] = k[start : start + length]
            values[blocks, :, offsets] = v[start : start + length]
            seg_q = q[start : start + length].transpose(0, 1)  # [Hq, Lp, D]
            if first == 0:
                seg_k = k[start : start + length].transpose(0, 1)  # [Hkv, Lp, D]
                seg_v = v[start : start + length].transpose(0, 1)
                out = F.scaled_dot_product_attention(
                    seg_q[None], seg_k[None], seg_v[None], is_causal=True, scale=self.scale, enable_gqa=True
                )  # [1, Hq, Lp, D]
            else:
                blocks, offsets = self.cache.positions_in_blocks(slot, 0, first + length)
                seg_k = keys[blocks, :, offsets].transpose(0, 1)  # [Hkv, first + Lp, D]
                seg_v = values[blocks, :, offsets].transpose(0, 1)
                # query i (position first + i) sees keys 0..first + i
                mask = torch.arange(first + length)[None, :] <= torch.arange(first, first + length)[:, None]
                out = F.scaled_dot_product_attention(
                    seg_q[None], seg_k[None], seg_v[None], attn_mask=mask.to(q.device), scale=self.scale,
                    enable_gqa=True,
                )
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
