"""Automatic prefix caching for the scheduler: find a prompt's cached prefix, copy it into the new
sequence's slot, and keep the full blocks of every prompt it prefills for the next request.

The index (``prefix_index.py``) names blocks; the core's prefix store (``core/prefix_store.py``) holds
their keys/values. Blocks are used only while they are copied (a sequence computes in its own slot),
so every cached block is evictable between steps, least recently used first.

A prompt always computes at least its last token (its logits choose the first new token), so a prompt
that is cached whole reuses all but its last block.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from textgen.engine.core import ModelCore
from textgen.engine.prefix_index import PrefixIndex, PrefixIndexStats

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrefixHit:
    blocks: list[int]  # held (acquired) until ``load`` copies them
    tokens: int


class PrefixCache:
    def __init__(self, core: ModelCore, *, shared: bool) -> None:
        store = core.prefix_store
        if store is None:
            raise ValueError("this core keeps no prefix store")
        self._core = core
        self.block_size = store.block_size
        self.index = PrefixIndex(store.block_size, shared=shared)
        self._free = list(range(store.blocks - 1, -1, -1))
        self.capacity_blocks = store.blocks

    def lookup(self, tenant: str | None, prompt: Sequence[int]) -> PrefixHit:
        """The longest cached prefix of ``prompt`` that leaves its last token to compute; its blocks are
        held until ``load`` or ``drop``."""
        keys = self.index.keys(tenant, prompt, limit=len(prompt) - 1)
        blocks = self.index.match(keys, prompt_tokens=len(prompt))
        self.index.acquire(blocks)
        return PrefixHit(blocks, len(blocks) * self.block_size)

    def load(self, slot: int, hit: PrefixHit) -> None:
        """Copy the hit's blocks into the fresh slot (which then holds ``hit.tokens`` positions)."""
        try:
            self._core.load_prefix(slot, hit.blocks)
        finally:
            self.drop(hit)

    def drop(self, hit: PrefixHit) -> None:
        """Stop holding the hit's blocks (loaded, or the sequence ended first)."""
        self.index.release(hit.blocks)

    def publish(self, tenant: str | None, slot: int, prompt: Sequence[int]) -> int:
        """Keep the full blocks of ``prompt`` (all in ``slot`` now) that are not cached yet, evicting the
        least recently used blocks for room. Returns how many blocks were added.

        The prompt's cached blocks are held meanwhile, so making room never evicts the head of the very
        chain being extended, and they count as just used."""
        held: list[int] = []  # in prefix order: released together at the end
        added = 0
        run_start, run = 0, []
        try:
            for number, key in enumerate(self.index.keys(tenant, prompt)):
                cached = self.index.cached(key)
                if cached is None:
                    block = self._take_block()
                    if block is not None and self.index.publish(key, block):
                        run.append(block)
                        continue
                    if block is not None:
                        self._free.append(block)
                    break  # no room: the blocks after this one could never be matched
                added += self._save_run(slot, run_start, run, held)
                self.index.acquire([cached])
                held.append(cached)
                run_start, run = number + 1, []
            added += self._save_run(slot, run_start, run, held)
        finally:
            self.index.release(held)
        return added

    def _save_run(self, slot: int, first_block: int, blocks: list[int], held: list[int]) -> int:
        """Copy one run of consecutive new blocks; on failure they are forgotten (never served unwritten)."""
        if not blocks:
            return 0
        try:
            self._core.save_prefix(slot, first_block, blocks)
        except Exception:
            self._free.extend(self.index.discard(blocks))
            raise
        held.extend(blocks)
        return len(blocks)

    def _take_block(self) -> int | None:
        if not self._free:
            self._free.extend(self.index.evict(1))
        return self._free.pop() if self._free else None

    def stats(self) -> PrefixIndexStats:
        return self.index.stats()
