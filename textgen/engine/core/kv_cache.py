"""The KV cache as pages: one pool of fixed-size blocks for every layer, a block table per sequence.

A sequence (a "slot": an id the scheduler holds while it runs) owns a ``BlockTable`` (blocks.py); its
position p lives in block ``table[p // block_size]`` at offset ``p % block_size``. Blocks are taken as a
sequence grows and given back when it retires, so memory follows the positions actually in use, and any
one sequence may use the model's whole context while short ones take only a block or two.

Memory is reserved up front (``blocks`` x block size positions, virtual) but touched lazily: a block is
zeroed the first time it is handed out (the PyTorch path reads whole blocks and masks the positions past
a sequence's length; uninitialised memory could hold NaN, which a zero weight does not cancel). The pool
hands out blocks freed earlier before untouched ones, so the resident set follows the most blocks in use
at once; ``reserved_bytes`` is the upper bound reported at start-up.

Shapes: NB = blocks, H = KV heads, BS = block size, D = head size; keys[layer], values[layer] [NB, H, BS, D].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from textgen.engine.core.blocks import BlockPool, BlockTable
from textgen.errors import EngineError

MIN_ZEROED_BLOCKS = 4  # blocks zeroed per call at least: fewer calls, and touched memory stays near use


class PagedKVCache:
    def __init__(
        self,
        layers: int,
        slots: int,
        kv_heads: int,
        capacity: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        *,
        blocks: int,
        block_size: int,
    ) -> None:
        shape = (blocks, kv_heads, block_size, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.pool = BlockPool(blocks, block_size)
        self.block_size = block_size
        self.slots = slots
        self.capacity = capacity  # positions one sequence may hold (the model's context, at most)
        self.device = device
        self._tables: dict[int, BlockTable] = {}  # in allocation order: the oldest sequence first
        # Every slot's block ids as one tensor [slots, blocks per sequence], kept in step with the tables
        # (sync_table) so a step passes it to attention as it is: no per-step construction.
        self.block_tables = torch.zeros((slots, -(-capacity // block_size)), dtype=torch.long)
        self._free_ids = list(range(slots - 1, -1, -1))
        self._zeroed = 0  # blocks [0, _zeroed) are initialised

    # ----- bookkeeping ---------------------------------------------------------------------------

    @property
    def block_bytes(self) -> int:
        """Bytes of one block over all layers, keys and values."""
        per_layer = self.keys[0][0].numel() * self.keys[0].element_size()
        return 2 * len(self.keys) * per_layer

    @property
    def reserved_bytes(self) -> int:
        return self.block_bytes * self.pool.total

    @property
    def touched_bytes(self) -> int:
        return self.block_bytes * self._zeroed

    @property
    def active(self) -> int:
        return len(self._tables)

    @property
    def free_slots(self) -> int:
        return len(self._free_ids)

    def slots_in_row_order(self) -> list[int]:
        return list(self._tables)

    def table(self, slot: int) -> BlockTable:
        return self._tables[slot]

    def length(self, slot: int) -> int:
        return self._tables[slot].length

    def lengths_of(self, slots: Sequence[int]) -> list[int]:
        return [self._tables[s].length for s in slots]

    def allocate(self) -> int:
        if not self._free_ids:
            raise EngineError("The KV cache has no free slot (more sequences than TEXTGEN_MAX_RUNNING).")
        slot = self._free_ids.pop()
        self._tables[slot] = BlockTable(self.pool)
        return slot

    def free(self, slot: int) -> None:
        """Release a sequence: its blocks go back to the pool (kept for the prefix cache where hashed)."""
        self._tables.pop(slot).release()
        self._free_ids.append(slot)

    def blocks_to_add(self, slot: int, tokens: int) -> int:
        """Blocks the sequence must take before ``tokens`` more positions are written."""
        table = self._tables[slot]
        return table.blocks_needed(table.length + tokens)

    def check_room(self, slot: int, tokens: int) -> None:
        if self.length(slot) + tokens > self.capacity:
            raise EngineError(f"Sequence exceeds the KV cache capacity of {self.capacity} positions.")

    def reserve(self, slot: int, tokens: int) -> None:
        """Blocks for ``tokens`` more positions of the sequence (OutOfBlocksError, taking none, when the pool
        has too few; EngineError past the capacity), zeroed where never used before."""
        table = self._tables[slot]
        if table.length + tokens <= min(table.capacity, self.capacity):
            return  # the common decode step: room in the last block
        self.check_room(slot, tokens)
        table.reserve(table.length + tokens)
        self._initialise_up_to(self.pool.high_water)
        self.sync_table(slot)

    def sync_table(self, slot: int) -> None:
        """Copy a sequence's block ids into ``block_tables`` (after its table changed: grown, copied on
        write, truncated, given a cached prefix)."""
        blocks = self._tables[slot].blocks
        if blocks:
            self.block_tables[slot, : len(blocks)] = torch.tensor(blocks, dtype=torch.long)

    def _initialise_up_to(self, blocks: int) -> None:
        """Zero blocks [_zeroed, blocks), at least MIN_ZEROED_BLOCKS at a time."""
        if blocks <= self._zeroed:
            return
        upto = min(self.pool.total, max(blocks, self._zeroed + MIN_ZEROED_BLOCKS))
        for cache in (*self.keys, *self.values):
            cache[self._zeroed : upto].zero_()
        self._zeroed = upto

    def copy_block(self, source: int, destination: int) -> None:
        """One block's keys and values in every layer (copy-on-write of a shared block)."""
        for cache in (*self.keys, *self.values):
            cache[destination].copy_(cache[source])

    def advance(self, slot: int, tokens: int = 1) -> None:
        self._tables[slot].length += tokens

    def tables_of(self, slots: Sequence[int]) -> torch.Tensor:
        """The block tables of ``slots`` as one [len(slots), W] int64 tensor (W: the most blocks any of them
        holds; entries past a table's end are stale or 0, and nothing reads past a sequence's length)."""
        width = max([1, *(len(self._tables[s].blocks) for s in slots)])
        return self.block_tables[torch.tensor(list(slots), dtype=torch.long), :width]

    def positions_in_blocks(self, slot: int, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(block ids, offsets) [stop - start] of a sequence's positions start..stop-1."""
        blocks = self._tables[slot].blocks
        positions = torch.arange(start, stop)
        table = torch.tensor(blocks, dtype=torch.long)
        return table[positions // self.block_size].to(self.device), (positions % self.block_size).to(self.device)
