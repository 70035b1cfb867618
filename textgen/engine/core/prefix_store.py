"""Cached prompt blocks: keys/values of full blocks of prompts, kept after their sequences end.

The slot cache (``kv_cache.py``) holds one sequence per slot, so a cached prefix cannot be shared in
place; its blocks are kept here instead and copied into a new sequence's slot (a copy of a 1,000-token
prefix is ~23 MB for SmolLM2-135M, milliseconds, against the ~0.8 s its prefill costs). Which block
holds which prefix is the prefix index's business (``engine/prefix_index.py``); this store only moves
tensors. Memory is reserved as ``blocks`` x block size positions and touched as blocks are first written.

Shapes: N = blocks, H = KV heads, B = block size (positions), D = head size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from textgen.engine.core.kv_cache import SlotKVCache


class PrefixBlockStore:
    def __init__(
        self,
        layers: int,
        blocks: int,
        kv_heads: int,
        block_size: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        if blocks < 1 or block_size < 1:
            raise ValueError(f"a prefix block store needs blocks >= 1 and block_size >= 1 ({blocks}, {block_size})")
        shape = (blocks, kv_heads, block_size, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)]  # [N, H, B, D] each
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.blocks = blocks
        self.block_size = block_size
        self.device = device

    @staticmethod
    def bytes_per_block(layers: int, kv_heads: int, block_size: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * layers * kv_heads * block_size * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def reserved_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def save(self, cache: SlotKVCache, slot: int, first_block: int, blocks: Sequence[int]) -> None:
        """Copy the slot's positions of its blocks ``first_block``, ``first_block + 1``, ... into ``blocks``."""
        if not blocks:
            return
        self._check(blocks)
        row, size = cache.rows_of([slot])[0], self.block_size
        start, end = first_block * size, (first_block + len(blocks)) * size
        if end > cache.length(slot):
            raise ValueError(f"slot {slot} holds {cache.length(slot)} positions; blocks up to {end} asked")
        index = torch.tensor(blocks, dtype=torch.long, device=self.device)
        for source, target in zip((*cache.keys, *cache.values), (*self.keys, *self.values), strict=True):
            part = source[row, :, start:end]  # [H, n B, D]
            target[index] = part.reshape(part.shape[0], len(blocks), size, part.shape[-1]).transpose(0, 1)

    def load(self, cache: SlotKVCache, slot: int, blocks: Sequence[int]) -> None:
        """Write ``blocks`` into the (empty) slot's first positions; the slot then holds that many."""
        if not blocks:
            return
        self._check(blocks)
        row, length = cache.rows_of([slot])[0], len(blocks) * self.block_size
        if cache.length(slot):
            raise ValueError(f"slot {slot} is not empty: a cached prefix goes into a fresh slot")
        cache.check_room(slot, length)
        index = torch.tensor(blocks, dtype=torch.long, device=self.device)
        for source, target in zip((*self.keys, *self.values), (*cache.keys, *cache.values), strict=True):
            target[row, :, :length] = source[index].transpose(0, 1).flatten(1, 2)  # [n, H, B, D] -> [H, n B, D]
        cache.advance([row], length)

    def _check(self, blocks: Sequence[int]) -> None:
        if min(blocks) < 0 or max(blocks) >= self.blocks:
            raise IndexError(f"block ids must be in [0, {self.blocks}); got {min(blocks)}..{max(blocks)}")
