"""The decode core: one of the architecture modules (Llama family, GPT-2) over a paged KV cache.

It only computes logits for the slots it is given; who runs, when, and for how long is the
scheduler's business (``engine/scheduler.py``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

import textgen.engine.core.gpt2 as gpt2
import textgen.engine.core.llama as llama
from textgen.engine.core.fused import FusedKernels
from textgen.engine.core.kv_cache import PagedKVCache
from textgen.engine.core.layers import Attention, DecodeAttention, MixedAttention, PrefillAttention
from textgen.engine.core.linear import Linear
from textgen.engine.core.weights import UNBOUNDED, LinearFactory, WeightPlan
from textgen.engine.pooling import mean_pool
from textgen.errors import ConfigError, EngineError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepOutput:
    """What one forward pass returns: next-token logits [decode rows + prefilled prompts, V] float32, and
    the mean final hidden state of each prefill-only input [pooled inputs, E] float32 (unnormalised)."""

    logits: torch.Tensor
    pooled: torch.Tensor


class ModelWeights(Protocol):
    """What the core reads of an architecture's weights (llama.LlamaWeights, gpt2.Gpt2Weights)."""

    @property
    def layers(self) -> Sequence[object]: ...

    @property
    def lm_head(self) -> Linear: ...

    @property
    def kv_heads(self) -> int: ...

    @property
    def head_dim(self) -> int: ...

    @property
    def scale(self) -> float: ...


@dataclass(frozen=True)
class Architecture:
    name: str
    unsupported_reason: Callable[[Any], str | None]
    build: Callable[..., ModelWeights]
    forward: Callable[[Any, torch.Tensor, torch.Tensor, Attention], torch.Tensor]
    # A model step through fused.c (weights, tokens, positions, rows of tables, cache, kernels, tables=block
    # tables [R, W]), and when it applies
    # (weights, tokens, longest live length); None where the architecture has none.
    step_fused: Callable[..., torch.Tensor] | None = None
    fused_supported: Callable[[Any, int, int], bool] | None = None


ARCHITECTURES = (
    Architecture(
        "llama", llama.unsupported_reason, llama.build, llama.forward, llama.step_fused, llama.fused_supported
    ),
    Architecture("gpt2", gpt2.unsupported_reason, gpt2.build, gpt2.forward),
)


def architecture_for(model: Any) -> tuple[Architecture | None, str]:
    """The module that can run this model, or None and why not (for the start-up log)."""
    reasons = []
    for arch in ARCHITECTURES:
        reason = arch.unsupported_reason(model)
        if reason is None:
            return arch, ""
        reasons.append(reason)
    return None, reasons[0]


class DecodeCore:
    """Prefill prompts into slots, decode one token for a set of slots, free slots."""

    def __init__(
        self,
        model: Any,
        arch: Architecture,
        plan: WeightPlan,
        factory: LinearFactory,
        *,
        slots: int,
        capacity: int,
        kv_memory: int | None = None,
        kv_memory_is_default: bool = False,
        block_size: int = 32,
        fused: FusedKernels | None = None,
        fused_off: str = "",
    ) -> None:
        self.name = f"textgen-{arch.name}"
        self.plan = plan
        self._arch = arch
        self._dtype = factory.compute_dtype
        self._device = factory.device
        self.weights = arch.build(model, factory, self._dtype, capacity)
        layers = len(self.weights.layers)
        block_bytes = 2 * layers * self.weights.kv_heads * block_size * self.weights.head_dim * self._dtype.itemsize
        per_sequence = -(-capacity // block_size)
        # no memory given: room for every slot at full capacity (reserved, touched as used)
        memory = kv_memory if kv_memory is not None else slots * per_sequence * block_bytes
        if kv_memory_is_default and memory < per_sequence * block_bytes:
            logger.warning(
                "The default KV cache memory (%.0f MiB) cannot hold one sequence at the model's full context; "
                "reserving %.0f MiB for it (set TEXTGEN_KV_CACHE_MEMORY to choose)",
                memory / 2**20,
                per_sequence * block_bytes / 2**20,
            )
            memory = per_sequence * block_bytes
        blocks = kv_blocks_for(memory, block_bytes, slots, per_sequence)
        self.cache = PagedKVCache(
            layers=len(self.weights.layers),
            slots=slots,
            kv_heads=self.weights.kv_heads,
            capacity=capacity,
            head_dim=self.weights.head_dim,
            dtype=self._dtype,
            device=self._device,
            blocks=blocks,
            block_size=block_size,
        )
        self.fallbacks = factory.fallbacks
        self._fused = fused if arch.step_fused is not None else None
        # why the step runs PyTorch's operators instead (for /ready and the bench header)
        self._fused_off = "" if self._fused else fused_off or f"no fused step for {arch.name}"

    # ----- the core contract ----------------------------------------------------------------------

    @property
    def extends(self) -> bool:
        return True

    @property
    def prefix_block_size(self) -> int:
        return self.cache.block_size

    def hold_prefix(self, keys: Sequence[Hashable]) -> list[int]:
        """The blocks holding the longest run of ``keys`` (full blocks' content names, in prefix order),
        each with one more reference, so they cannot be evicted before ``load_prefix`` or ``release_blocks``."""
        pool, blocks = self.cache.pool, []
        for key in keys:
            block = pool.cached(key)
            if block is None:
                break
            pool.share(block)
            blocks.append(block)
        return blocks

    def release_blocks(self, blocks: Sequence[int]) -> None:
        self.cache.pool.release_all(list(blocks))

    def load_prefix(self, slot: int, blocks: Sequence[int]) -> None:
        """Start the fresh sequence in ``slot`` with these full (cached) blocks, shared, not copied."""
        table = self.cache.table(slot)
        if table.blocks or table.length:
            raise EngineError(f"slot {slot} is not empty: a cached prefix starts a fresh sequence")
        self.cache.check_room(slot, len(blocks) * self.cache.block_size)
        table.append_shared(list(blocks))
        table.length = len(blocks) * self.cache.block_size

    def publish_prefix(self, slot: int, keys: Sequence[Hashable]) -> None:
        """Name the sequence's first full blocks by ``keys`` so later prompts find them (a block already
        named keeps its name; the first copy of a content is the one found)."""
        table = self.cache.table(slot)
        full = min(len(keys), table.length // self.cache.block_size)
        for block, key in zip(table.blocks[:full], keys[:full], strict=True):
            self.cache.pool.set_hash(block, key)

    @property
    def capacity(self) -> int:
        return self.cache.capacity

    @property
    def free_slots(self) -> int:
        return self.cache.free_slots

    @property
    def free_blocks(self) -> int:
        """KV blocks that new positions can take now."""
        return self.cache.pool.free

    @property
    def total_blocks(self) -> int:
        return self.cache.pool.total

    def blocks_needed(self, decode_slots: Sequence[int], prompt_lengths: Sequence[int]) -> int:
        """KV blocks a step would take: one more position for each decoding slot, whole new prompts."""
        cache = self.cache
        return sum(cache.blocks_to_add(slot, 1) for slot in decode_slots) + sum(
            cache.pool.blocks_for(length) for length in prompt_lengths
        )

    def allocate(self) -> int:
        return self.cache.allocate()

    def free(self, slots: Sequence[int]) -> None:
        for slot in slots:
            self.cache.free(slot)

    def slots_in_order(self) -> list[int]:
        """The order in which decode() reads the cache without copying."""
        return self.cache.slots_in_row_order()

    def prefill(self, slots: Sequence[int], prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Write each prompt's keys/values into its (empty) slot. Returns next-token logits [B, V] float32."""
        return self.step([], torch.empty(0, dtype=torch.long), slots, prompts)

    def decode(self, slots: Sequence[int], tokens: torch.Tensor) -> torch.Tensor:
        """Feed each slot its next token [B]; returns logits [B, V] float32, rows in the order of ``slots``."""
        return self.step(slots, tokens, [], [])

    def step(
        self,
        decode_slots: Sequence[int],
        tokens: torch.Tensor,
        prefill_slots: Sequence[int],
        prompts: Sequence[Sequence[int]],
    ) -> torch.Tensor:
        """One forward pass for both: a token for each decoding slot, whole prompts for fresh slots.

        Sharing the pass matters on a CPU, where reading the weights costs about as much as a small
        batch's arithmetic: a separate prefill pass would cost nearly a whole extra decode step.
        Returns logits [len(decode_slots) + len(prefill_slots), V] float32, decode rows first.
        """
        return self.step_pooled(decode_slots, tokens, prefill_slots, prompts, [], []).logits

    @torch.inference_mode()
    def step_pooled(
        self,
        decode_slots: Sequence[int],
        tokens: torch.Tensor,
        prefill_slots: Sequence[int],
        prompts: Sequence[Sequence[int]],
        pool_slots: Sequence[int],
        pool_prompts: Sequence[Sequence[int]],
    ) -> StepOutput:
        """``step``, plus prefill-only inputs in the same pass: ``pool_prompts`` are prefilled into the
        fresh (scratch) ``pool_slots`` like prompts, but come back as the mean of their final hidden
        states (``pooled`` [len(pool_slots), E] float32, not normalised) instead of logits; the caller
        frees their slots after the step."""
        cache = self.cache
        lengths = cache.lengths_of(decode_slots)
        fresh = [*prefill_slots, *pool_slots]
        starts = cache.lengths_of(fresh)  # where each prompt continues its sequence (0: a new one)
        for slot, prompt in zip(fresh, [*prompts, *pool_prompts], strict=True):
            cache.check_room(slot, len(prompt))
        # Blocks first, for everyone (nothing computed yet if the pool runs short: OutOfBlocksError; a
        # sequence at its capacity: EngineError).
        for slot in decode_slots:
            cache.reserve(slot, 1)
        for slot, prompt in zip(fresh, [*prompts, *pool_prompts], strict=True):
            cache.reserve(slot, len(prompt))
        segments: list[tuple[int, int, int, int]] = []  # (sequence, start in prompt_tokens, length, first position)
        prompt_tokens: list[int] = []
        positions, last = list(lengths), list(range(len(decode_slots)))
        pooled_spans: list[tuple[int, int]] = []  # (start in the pass's tokens, length)
        start = 0
        decoding = len(decode_slots)
        for slot, first, prompt in zip(fresh, starts, [*prompts, *pool_prompts], strict=True):
            segments.append((slot, start, len(prompt), first))
            prompt_tokens.extend(prompt)
            positions.extend(range(first, first + len(prompt)))
            if len(segments) <= len(prefill_slots):
                last.append(decoding + start + len(prompt) - 1)
            else:
                pooled_spans.append((decoding + start, len(prompt)))
            start += len(prompt)
        all_tokens = torch.cat([tokens.to(torch.long).cpu(), torch.tensor(prompt_tokens, dtype=torch.long)])
        if self._fused_applies(len(positions), max(positions, default=0) + 1):
            # Every token at its own (sequence, position): decode rows and whole prompts in one pass; a
            # token's row of the cache's block tables is its sequence's slot.
            token_rows = list(decode_slots) + [slot for slot, _, length, _ in segments for _ in range(length)]
            hidden = self._step_fused(all_tokens, token_rows, positions, cache.block_tables)
        else:
            attention = MixedAttention(
                DecodeAttention.plan(cache, decode_slots, lengths, self.weights.scale) if decode_slots else None,
                PrefillAttention(cache, segments, self.weights.scale) if segments else None,
                decoding,
            )
            hidden = self._forward(all_tokens, positions, attention)  # [N, E]
        for slot in decode_slots:
            cache.advance(slot)
        for slot, _, length, _ in segments:
            cache.advance(slot, length)
        pooled = mean_pool(hidden, pooled_spans)
        if not last:  # prefill-only inputs alone: no logits to compute
            return StepOutput(torch.empty((0, 0), dtype=torch.float32), pooled)
        if len(last) != hidden.shape[0]:
            hidden = hidden.index_select(0, torch.tensor(last, dtype=torch.long, device=self._device))
        return StepOutput(self.weights.lm_head(hidden), pooled)

    @torch.inference_mode()
    def score(self, tokens: Sequence[int]) -> torch.Tensor:
        """Logits after every position of one sequence [L, V] float32 (for perplexity), in a scratch slot."""
        slot = self.allocate()
        try:
            self.cache.reserve(slot, len(tokens))
            attention = PrefillAttention(self.cache, [(slot, 0, len(tokens), 0)], self.weights.scale)
            return self.weights.lm_head(self._forward(tokens, range(len(tokens)), attention))
        finally:
            self.free([slot])


    def _fused_applies(self, batch: int, live: int) -> bool:
        supported = self._arch.fused_supported
        return self._fused is not None and supported is not None and supported(self.weights, batch, live)

    def _step_fused(
        self, tokens: torch.Tensor, rows: list[int], positions: list[int], tables: torch.Tensor
    ) -> torch.Tensor:
        """tokens [N] at positions [N] of the sequences whose block tables are rows [N] of tables -> final
        hidden states [N, E]."""
        assert self._fused is not None and self._arch.step_fused is not None
        return self._arch.step_fused(
            self.weights,
            tokens,
            torch.tensor(positions, dtype=torch.long),
            torch.tensor(rows, dtype=torch.long),
            self.cache,
            self._fused,
            tables=tables,
        )

    def _forward(
        self, tokens: Sequence[int] | torch.Tensor, positions: Sequence[int], attention: Attention
    ) -> torch.Tensor:
        token_t = torch.as_tensor(tokens, dtype=torch.long).to(self._device)
        position_t = torch.tensor(positions, dtype=torch.long, device=self._device)
        return self._arch.forward(self.weights, token_t, position_t, attention)

    # ----- choosing between weight formats ---------------------------------------------------------

    def set_plan(self, plan: WeightPlan) -> None:
        """Move the batch-size limits between the formats the core was built with (the same formats in the
        same order), or keep one of them alone (the other's kernels are dropped)."""
        formats = self.plan.formats
        if len(plan.tiers) == 1 and len(formats) > 1:
            keep = formats.index(plan.formats[0])
            for linear in _linears(self.weights):
                linear.kernels = [(UNBOUNDED, linear.kernels[keep][1])]
        else:
            assert plan.formats == formats, (plan, self.plan)
            limits = [max_rows for max_rows, _ in plan.tiers]
            for linear in _linears(self.weights):
                linear.kernels = [(limit, kernel) for limit, (_, kernel) in zip(limits, linear.kernels, strict=True)]
        self.plan = plan

    def time_decode_steps(self, batch: int, small_limit: float, steps: int = 4) -> float:
        """ms per decode step of ``batch`` rows (short prompts) with the first format serving batches up to
        small_limit and the second the rest; the core's own plan is restored afterwards."""
        built = self.plan
        if len(built.tiers) == 2:
            self.set_plan(WeightPlan(((small_limit, built.tiers[0][1]), (UNBOUNDED, built.tiers[1][1]))))
        slots = [self.allocate() for _ in range(batch)]
        try:
            tokens = self.prefill(slots, [list(range(1, 17))] * batch).argmax(-1)
            tokens = self.decode(slots, tokens).argmax(-1)  # warm: this batch size's first call
            started = time.perf_counter()
            for _ in range(steps):
                tokens = self.decode(slots, tokens).argmax(-1)
            return (time.perf_counter() - started) * 1e3 / steps
        finally:
            self.free(slots)
            self.set_plan(built)

    # ----- reporting -------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        linears = _linears(self.weights)
        return {
            "core": self.name,
            "weights": self.plan.describe(),
            "weights_bytes": sum(layer.nbytes() for layer in linears),
            "kv_cache_bytes": self.cache.reserved_bytes,
            "slots": self.cache.slots,
            "positions_per_slot": self.cache.capacity,
            "kv_blocks": self.cache.pool.total,
            "kv_block_size": self.cache.block_size,
            "kv_blocks_cached": self.cache.pool.cached_free,
            "dtype": str(self._dtype).removeprefix("torch."),
            "fused_kernels": self._fused is not None,
            **({"fused_kernels_off": self._fused_off} if self._fused_off else {}),
        }


def kv_blocks_for(memory: int, block_bytes: int, sequences: int, blocks_per_sequence: int) -> int:
    """How many KV blocks ``memory`` bytes buy: never more than every sequence at full context can use, and at
    least one full-context sequence (ConfigError naming the setting otherwise)."""
    blocks = min(memory // block_bytes, sequences * blocks_per_sequence)
    if blocks < blocks_per_sequence:
        raise ConfigError(
            f"The KV cache memory ({memory / 2**20:.0f} MiB) holds {blocks} blocks of {block_bytes / 2**10:.0f} KiB; "
            f"one sequence at the model's full context needs {blocks_per_sequence}. Raise TEXTGEN_KV_CACHE_MEMORY "
            f"to at least {blocks_per_sequence * block_bytes / 2**20:.0f} MiB (or lower the context with "
            "TEXTGEN_MAX_PROMPT_TOKENS)."
        )
    return blocks


def _linears(weights: ModelWeights) -> list[Linear]:
    found = [weights.lm_head]
    for layer in weights.layers:
        found.extend(value for value in vars(layer).values() if hasattr(value, "kernel_for"))
    return found
