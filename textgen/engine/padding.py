"""Left padding for the HF fallback core (``core/hf.py``): the rows in flight as one ``PaddedRows``, tensors
for every in-flight sequence, left-aligned.

Rows are left-padded so that every sequence's newest token sits in the last column; a decode step
then feeds one token per row. ``filter`` drops finished rows and trims padding columns no row needs;
``concat`` joins a freshly prefilled batch to the running one. Both keep ``rows`` (the caller's
per-sequence objects) aligned with the tensor rows, so admission and retirement can be tested
without a server.

Shapes: B = rows, T = cached positions (padding included), H = KV heads, D = head size, V = vocab.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import CacheLayerMixin

RowT = TypeVar("RowT")


def _filled_layers(cache: DynamicCache) -> list[tuple[CacheLayerMixin, torch.Tensor, torch.Tensor]]:
    """Each layer of a prefilled cache with its keys and values [B, H, T, D] (a layer without them, or one of
    transformers' linear-attention layers, has nothing this batch can filter or pad)."""
    filled = []
    for layer in cache.layers:
        if not isinstance(layer, CacheLayerMixin) or layer.keys is None or layer.values is None:
            raise TypeError(f"cache layer {type(layer).__name__} holds no keys and values to batch")
        filled.append((layer, layer.keys, layer.values))
    return filled


@dataclass
class PaddedRows(Generic[RowT]):
    rows: list[RowT]
    cache: DynamicCache  # per layer: keys, values [B, H, T, D]
    attention_mask: torch.Tensor  # [B, T] long, 1 = real token, 0 = left padding
    next_positions: torch.Tensor  # [B] long, position id of the token in last_tokens
    last_tokens: torch.Tensor  # [B] long, the token the next decode step feeds

    @property
    def size(self) -> int:
        return len(self.rows)

    @property
    def cached_length(self) -> int:
        return int(self.attention_mask.shape[1])

    def filter(self, keep: Sequence[int]) -> PaddedRows[RowT]:
        """Keep only the given row indices (in that order), then trim all-padding columns."""
        index = torch.tensor(list(keep), dtype=torch.long, device=self.attention_mask.device)
        mask = self.attention_mask.index_select(0, index)
        first_needed = _first_nonpad_column(mask)
        for layer, keys, values in _filled_layers(self.cache):
            layer.keys = keys.index_select(0, index)[:, :, first_needed:]
            layer.values = values.index_select(0, index)[:, :, first_needed:]
        self.rows = [self.rows[i] for i in keep]
        self.attention_mask = mask[:, first_needed:]
        self.next_positions = self.next_positions.index_select(0, index)
        self.last_tokens = self.last_tokens.index_select(0, index)
        return self

    def concat(self, other: PaddedRows[RowT]) -> PaddedRows[RowT]:
        """Append other's rows after ours, left-padding the shorter cache to a common length."""
        length = max(self.cached_length, other.cached_length)
        for (mine, keys, values), (_, their_keys, their_values) in zip(
            _filled_layers(self.cache), _filled_layers(other.cache), strict=True
        ):
            mine.keys = torch.cat([_left_pad(keys, length), _left_pad(their_keys, length)])
            mine.values = torch.cat([_left_pad(values, length), _left_pad(their_values, length)])
        self.attention_mask = torch.cat(
            [_left_pad_mask(self.attention_mask, length), _left_pad_mask(other.attention_mask, length)]
        )
        self.rows = self.rows + other.rows
        self.next_positions = torch.cat([self.next_positions, other.next_positions])
        self.last_tokens = torch.cat([self.last_tokens, other.last_tokens])
        return self


def _first_nonpad_column(mask: torch.Tensor) -> int:
    used = mask.any(dim=0).nonzero()
    return int(used[0]) if used.numel() else mask.shape[1]


def _left_pad(kv: torch.Tensor, length: int) -> torch.Tensor:
    """[B, H, T, D] -> [B, H, length, D] with zeros in front."""
    return F.pad(kv, (0, 0, length - kv.shape[2], 0))


def _left_pad_mask(mask: torch.Tensor, length: int) -> torch.Tensor:
    return F.pad(mask, (length - mask.shape[1], 0))


def left_pad_prompts(
    prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> input_ids [B, L] and attention_mask [B, L], padded on the left."""
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
        mask[row, length - len(prompt) :] = 1
    return ids.to(device), mask.to(device)


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """[B, L] mask -> [B, L] position ids counting real tokens only (padding gets 0)."""
    return (mask.cumsum(dim=-1) - 1).clamp_(min=0)


@torch.inference_mode()
def prefill(
    model: PreTrainedModel, prompts: Sequence[Sequence[int]], rows: list[RowT], pad_id: int
) -> tuple[PaddedRows[RowT], torch.Tensor]:
    """Run the prompts through the model together. Returns the new batch and logits [B, V].

    The batch's ``last_tokens`` are placeholders until the caller sets the sampled first tokens.
    """
    device = model.device
    input_ids, mask = left_pad_prompts(prompts, pad_id, device)  # [B, L]
    # A full-length cache for every layer, sliding-window ones included: transformers' own sliding layers
    # (DynamicCache(config=...)) keep only the last window of columns, which filter/concat and the padded
    # attention mask (one column per cached position) cannot line up with at C>1. The window is applied by
    # the model's sliding mask over the full cache instead: more memory for long sequences, same outputs.
    cache = DynamicCache()
    output = model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=positions_from_mask(mask),
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    batch = PaddedRows(
        rows=rows,
        cache=output.past_key_values,
        attention_mask=mask,
        next_positions=mask.sum(dim=-1),
        last_tokens=torch.zeros(len(rows), dtype=torch.long, device=device),
    )
    return batch, output.logits[:, -1, :]


@torch.inference_mode()
def decode_step(model: PreTrainedModel, batch: PaddedRows[RowT]) -> torch.Tensor:
    """Feed every row its last token; grow the cache by one column. Returns logits [B, V]."""
    mask = F.pad(batch.attention_mask, (0, 1), value=1)  # [B, T+1]
    output = model(
        input_ids=batch.last_tokens[:, None],
        attention_mask=mask,
        position_ids=batch.next_positions[:, None],
        past_key_values=batch.cache,
        use_cache=True,
        logits_to_keep=1,
    )
    batch.attention_mask = mask
    batch.next_positions = batch.next_positions + 1
    logits: torch.Tensor = output.logits[:, -1, :]
    return logits
