"""Automatic prefix caching for the scheduler: find a prompt's cached prefix, start the new sequence on
those KV blocks (shared, by reference count), and name the full blocks of every prompt it prefills so the
next request finds them.

The keys (chained, salted per tenant) come from ``prefix_index.py``; the blocks, their reference
counts and the least-recently-used order of cached blocks nobody uses are the core's KV block pool
(``core/blocks.py``): a finished sequence's named blocks stay findable until the pool needs them.

A prompt always computes at least its last token (its logits choose the first new token), so a prompt
that is cached whole reuses all but its last block.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from textgen.engine.core import ModelCore
from textgen.engine.prefix_index import PrefixIndex, PrefixIndexStats


@dataclass(frozen=True)
class PrefixHit:
    blocks: list[int]  # held (one reference each) until ``load`` or ``drop``
    tokens: int


class PrefixCache:
    def __init__(self, core: ModelCore, *, shared: bool) -> None:
        if core.prefix_block_size < 1:
            raise ValueError("this core keeps no KV blocks to cache prefixes in")
        self._core = core
        self.block_size = core.prefix_block_size
        self.index = PrefixIndex(self.block_size, shared=shared)

    def lookup(self, tenant: str | None, prompt: Sequence[int]) -> PrefixHit:
        """The longest cached prefix of ``prompt`` that leaves its last token to compute; its blocks are
        held (they cannot be evicted) until ``load`` or ``drop``."""
        keys = self.index.keys(tenant, prompt, limit=len(prompt) - 1)
        blocks = self._core.hold_prefix(keys)
        self.index.count(len(prompt), len(blocks) * self.block_size)
        return PrefixHit(blocks, len(blocks) * self.block_size)

    def load(self, slot: int, hit: PrefixHit) -> None:
        """Start the fresh sequence in ``slot`` on the hit's blocks (it then holds ``hit.tokens`` positions)."""
        try:
            self._core.load_prefix(slot, hit.blocks)
        finally:
            self.drop(hit)

    def drop(self, hit: PrefixHit) -> None:
        """Stop holding the hit's blocks (loaded, or the sequence ended first)."""
        self._core.release_blocks(hit.blocks)

    def give_back(self, hit: PrefixHit, prompt_tokens: int) -> None:
        """Stop holding a hit that was not used yet and forget the lookup (the prompt waits and will be
        looked up again): held blocks are not free, and a waiting prompt must not keep running ones from
        growing."""
        self.drop(hit)
        self.index.uncount(prompt_tokens, hit.tokens)

    def publish(self, tenant: str | None, slot: int, prompt: Sequence[int]) -> None:
        """Name the full blocks of ``prompt`` (all in ``slot`` now) so later prompts find them."""
        self._core.publish_prefix(slot, self.index.keys(tenant, prompt))

    def prefill_named(self, tenant: str | None, tokens: Sequence[int], chunk_tokens: int) -> bool:
        """Compute the next full blocks of ``tokens`` after its longest cached prefix (``chunk_tokens`` at
        most, one block at least) and name them: prefilled in a scratch slot on the cached blocks, exactly as
        a prompt continuing that prefix computes them, so a later prompt finds the keys and values it would
        have computed itself. Returns whether blocks are left to do; False also when nothing of ``tokens``
        is cached to start from (a whole prompt is not recomputed on spec) or no slot or blocks are free."""
        keys = self.index.keys(tenant, tokens)
        held = self._core.hold_prefix(keys)
        try:
            if not held or len(held) == len(keys) or self._core.free_slots < 1:
                return False
            stop = min(len(keys), len(held) + max(1, chunk_tokens // self.block_size))
            start, end = len(held) * self.block_size, stop * self.block_size
            if self._core.blocks_needed([], [end - start]) > self._core.free_blocks:
                return False
            slot = self._core.allocate()
            try:
                self._core.load_prefix(slot, held)
                self._core.step([], torch.empty(0, dtype=torch.long), [slot], [list(tokens[start:end])])
                self._core.publish_prefix(slot, keys[:stop])
            finally:
                self._core.free([slot])
            return stop < len(keys)
        finally:
            self._core.release_blocks(held)

    def stats(self) -> PrefixIndexStats:
        return self.index.stats()
