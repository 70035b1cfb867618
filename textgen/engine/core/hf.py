"""The transformers core: any causal LM transformers can run, behind the same slot contract.

Used for architectures the decode core does not cover. Rows live in a left-padded ``PaddedRows`` whose
cache grows by one column per step and is trimmed when rows leave (see ``engine/padding.py``).
"""

from __future__ import annotations

import sys
from collections.abc import Hashable, Sequence
from typing import Any

import torch
from transformers import PreTrainedModel

from textgen.engine.core.decoder import StepOutput
from textgen.engine.padding import PaddedRows, decode_step, prefill
from textgen.engine.pooling import transformers_pooled
from textgen.errors import EngineError


class TransformersCore:
    name = "transformers"

    def __init__(self, model: PreTrainedModel, pad_id: int, slots: int, capacity: int) -> None:
        self._model = model
        self._pad_id = pad_id
        self._batch: PaddedRows[int] | None = None  # rows are slot ids
        self._free_ids = list(range(slots - 1, -1, -1))
        self._slots = slots
        self.capacity = capacity

    @property
    def free_slots(self) -> int:
        return len(self._free_ids)

    @property
    def extends(self) -> bool:
        return False  # left-padded rows: a prompt is prefilled whole, in one step

    @property
    def prefix_block_size(self) -> int:
        return 0  # no prefix cache: rows are padded, not in blocks

    def hold_prefix(self, keys: Sequence[Hashable]) -> list[int]:
        return []

    def release_blocks(self, blocks: Sequence[int]) -> None:
        if blocks:
            raise EngineError("The transformers core keeps no prefix cache.")

    def load_prefix(self, slot: int, blocks: Sequence[int]) -> None:
        if blocks:
            raise EngineError("The transformers core keeps no prefix cache.")

    def publish_prefix(self, slot: int, keys: Sequence[Hashable]) -> None:
        return None

    @property
    def decode_kv_is_prefill_kv(self) -> bool:
        return False  # no prefix cache to name generated blocks in
    # No block pool: transformers' own cache grows per batch; admission is by slots alone.
    free_blocks = sys.maxsize
    total_blocks = 0

    def blocks_needed(self, decode_slots: Sequence[int], prompt_lengths: Sequence[int]) -> int:
        return 0

    def allocate(self) -> int:
        if not self._free_ids:
            raise EngineError("No free slot (more sequences than TEXTGEN_MAX_RUNNING).")
        return self._free_ids.pop()

    def slots_in_order(self) -> list[int]:
        return [] if self._batch is None else list(self._batch.rows)

    def prefill(self, slots: Sequence[int], prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        batch, logits = prefill(self._model, prompts, list(slots), self._pad_id)
        self._batch = batch if self._batch is None else self._batch.concat(batch)
        return logits.float()

    def decode(self, slots: Sequence[int], tokens: torch.Tensor) -> torch.Tensor:
        batch = self._batch
        if batch is None:
            raise EngineError("decode() before any prefill")
        if batch.rows != list(slots):
            position = {slot: row for row, slot in enumerate(batch.rows)}
            batch = batch.filter([position[s] for s in slots])
            self._batch = batch
        batch.last_tokens = tokens.to(batch.last_tokens.device)
        return decode_step(self._model, batch).float()

    def step(
        self,
        decode_slots: Sequence[int],
        tokens: torch.Tensor,
        prefill_slots: Sequence[int],
        prompts: Sequence[Sequence[int]],
    ) -> torch.Tensor:
        """Decode, then prefill: transformers' padded batch cannot mix the two in one pass."""
        parts = []
        if decode_slots:
            parts.append(self.decode(decode_slots, tokens))
        if prefill_slots:
            parts.append(self.prefill(prefill_slots, prompts))
        return torch.cat(parts) if parts else torch.empty((0, 0), dtype=torch.float32)

    def step_pooled(
        self,
        decode_slots: Sequence[int],
        tokens: torch.Tensor,
        prefill_slots: Sequence[int],
        prompts: Sequence[Sequence[int]],
        pool_slots: Sequence[int],
        pool_prompts: Sequence[Sequence[int]],
    ) -> StepOutput:
        """``step``, then the prefill-only inputs in a padded pass of their own (their slots only count
        them: nothing is cached for them). -> logits and pooled means, as ``DecodeCore.step_pooled``."""
        logits = self.step(decode_slots, tokens, prefill_slots, prompts)
        pooled = transformers_pooled(self._model, pool_prompts, self._pad_id) if pool_prompts else None
        return StepOutput(logits, torch.empty((0, 0)) if pooled is None else pooled)

    @torch.inference_mode()
    def score(self, tokens: Sequence[int]) -> torch.Tensor:
        """Logits after every position of one sequence [L, V] float32 (prompt log-probabilities), in a
        forward pass of its own (no cache kept)."""
        device = next(self._model.parameters()).device
        ids = torch.tensor([list(tokens)], dtype=torch.long, device=device)
        logits: torch.Tensor = self._model(input_ids=ids, use_cache=False).logits[0]
        return logits.float()

    def free(self, slots: Sequence[int]) -> None:
        gone = set(slots)
        self._free_ids.extend(slots)
        if self._batch is None or gone.isdisjoint(self._batch.rows):  # e.g. only prefill-only inputs' slots
            return
        keep = [row for row, slot in enumerate(self._batch.rows) if slot not in gone]
        self._batch = self._batch.filter(keep) if keep else None

    def describe(self) -> dict[str, Any]:
        return {"core": self.name, "weights": str(self._model.dtype).removeprefix("torch."), "slots": self._slots}
