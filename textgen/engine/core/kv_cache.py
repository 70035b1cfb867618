"""The KV cache, allocated once: ``slots`` sequences x ``capacity`` positions for every layer.

Admission writes a prompt's keys/values into a free slot; retirement frees it; nothing is concatenated,
padded or re-indexed per step. Occupied slots are kept dense at rows 0..n-1 (freeing a slot moves the
last row into the hole, one sequence's worth of copying), so a decode step reads the cache as a view
``[:n, :, :live]`` and attention touches only the live length.

Memory is reserved up front but touched lazily: positions are zeroed for all slots together, in
growing chunks, the first time any sequence reaches them (attention multiplies masked positions by
zero, and uninitialised memory could hold NaN). Resident memory therefore follows the longest
sequence seen so far; ``reserved_bytes`` is the upper bound reported at start-up.

Shapes: S = slots, H = KV heads, T = capacity, D = head size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from textgen.errors import EngineError

MIN_ZEROED_CHUNK = 64


class SlotKVCache:
    def __init__(
        self,
        layers: int,
        slots: int,
        kv_heads: int,
        capacity: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (slots, kv_heads, capacity, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)]  # [S, H, T, D] each
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.slots = slots
        self.capacity = capacity
        self.device = device
        self._row_of: dict[int, int] = {}  # slot id -> dense row
        self._slot_at: list[int] = []  # dense row -> slot id
        self._lengths: list[int] = []  # dense row -> cached positions
        self._free_ids = list(range(slots - 1, -1, -1))
        self._zeroed = 0  # positions [0, _zeroed) are initialised in every slot

    # ----- bookkeeping ---------------------------------------------------------------------------

    @property
    def reserved_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    @property
    def active(self) -> int:
        return len(self._slot_at)

    @property
    def free_slots(self) -> int:
        return len(self._free_ids)

    def slots_in_row_order(self) -> list[int]:
        return list(self._slot_at)

    def length(self, slot: int) -> int:
        return self._lengths[self._row_of[slot]]

    def allocate(self) -> int:
        if not self._free_ids:
            raise EngineError("The KV cache has no free slot (more sequences than TEXTGEN_MAX_RUNNING).")
        slot = self._free_ids.pop()
        self._row_of[slot] = len(self._slot_at)
        self._slot_at.append(slot)
        self._lengths.append(0)
        return slot

    def free(self, slot: int) -> None:
        """Release a slot; the last row moves into its place so occupied rows stay 0..n-1."""
        row = self._row_of.pop(slot)
        last = len(self._slot_at) - 1
        if row != last:
            moved = self._slot_at[last]
            live = self._lengths[last]
            for cache in (*self.keys, *self.values):
                cache[row, :, :live] = cache[last, :, :live]
            self._slot_at[row] = moved
            self._lengths[row] = live
            self._row_of[moved] = row
        self._slot_at.pop()
        self._lengths.pop()
        self._free_ids.append(slot)

    def rows_of(self, slots: Sequence[int]) -> list[int]:
        return [self._row_of[s] for s in slots]

    def check_room(self, slot: int, tokens: int) -> None:
        if self.length(slot) + tokens > self.capacity:
            raise EngineError(f"Sequence exceeds the KV cache capacity of {self.capacity} positions.")

    def ensure_initialised(self, positions: int) -> None:
        """Zero positions up to ``positions`` (rounded up to a chunk) in every slot, once."""
        if positions <= self._zeroed:
            return
        upto = min(self.capacity, max(positions, 2 * self._zeroed, MIN_ZEROED_CHUNK))
        for cache in (*self.keys, *self.values):
            cache[:, :, self._zeroed : upto].zero_()
        self._zeroed = upto

    @property
    def touched_bytes(self) -> int:
        return self.reserved_bytes * self._zeroed // self.capacity

    def advance(self, rows: Sequence[int], tokens: int = 1) -> None:
        for row in rows:
            self._lengths[row] += tokens

    def truncate(self, slot: int, length: int) -> None:
        """Keep the slot's first ``length`` positions (rolling back positions written by a step whose tokens
        were not kept); what lies past them is never read and is overwritten as the sequence grows again."""
        row = self._row_of[slot]
        if not 0 <= length <= self._lengths[row]:
            raise EngineError(f"Cannot truncate a sequence of {self._lengths[row]} positions to {length}.")
        self._lengths[row] = length

    def lengths_of(self, rows: Sequence[int]) -> list[int]:
        return [self._lengths[r] for r in rows]
