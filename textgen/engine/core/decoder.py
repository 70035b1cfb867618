"""The decode core: one of the architecture modules (Llama family, GPT-2) over a slot KV cache.

It only computes logits for the slots it is given; who runs, when, and for how long is the
scheduler's business (``engine/scheduler.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

import textgen.engine.core.gpt2 as gpt2
import textgen.engine.core.llama as llama
from textgen.engine.core.fused import FusedKernels
from textgen.engine.core.kv_cache import SlotKVCache
from textgen.engine.core.layers import Attention, DecodeAttention, MixedAttention, PrefillAttention
from textgen.engine.core.linear import Linear
from textgen.engine.core.prefix_store import PrefixBlockStore
from textgen.engine.core.weights import UNBOUNDED, LinearFactory, WeightPlan
from textgen.engine.pooling import mean_pool
from textgen.errors import EngineError


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
    # A model step through fused.c (weights, tokens, positions, cache rows, cache, kernels), and when it applies
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
        fused: FusedKernels | None = None,
        fused_off: str = "",
        prefix_cache_bytes: int = 0,
        prefix_block_size: int = 16,
    ) -> None:
        self.name = f"textgen-{arch.name}"
        self.plan = plan
        self._arch = arch
        self._dtype = factory.compute_dtype
        self._device = factory.device
        self.weights = arch.build(model, factory, self._dtype, capacity)
        self.cache = SlotKVCache(
            layers=len(self.weights.layers),
            slots=slots,
            kv_heads=self.weights.kv_heads,
            capacity=capacity,
            head_dim=self.weights.head_dim,
            dtype=self._dtype,
            device=self._device,
        )
        self._prefix_store = self._build_prefix_store(prefix_cache_bytes, prefix_block_size)
        self.fallbacks = factory.fallbacks
        self._fused = fused if arch.step_fused is not None else None
        # why the step runs PyTorch's operators instead (for /ready and the bench header)
        self._fused_off = "" if self._fused else fused_off or f"no fused step for {arch.name}"

    def _build_prefix_store(self, budget_bytes: int, block_size: int) -> PrefixBlockStore | None:
        layers, kv_heads, head_dim = len(self.weights.layers), self.weights.kv_heads, self.weights.head_dim
        per_block = PrefixBlockStore.bytes_per_block(layers, kv_heads, block_size, head_dim, self._dtype)
        blocks = budget_bytes // per_block if block_size > 0 else 0
        if blocks < 1:
            return None
        return PrefixBlockStore(layers, blocks, kv_heads, block_size, head_dim, self._dtype, self._device)

    # ----- the core contract ----------------------------------------------------------------------

    @property
    def extends(self) -> bool:
        return True

    @property
    def prefix_store(self) -> PrefixBlockStore | None:
        return self._prefix_store

    def load_prefix(self, slot: int, blocks: Sequence[int]) -> None:
        """Copy cached blocks into the fresh slot's first positions."""
        if self._prefix_store is None:
            raise EngineError("This core keeps no prefix cache.")
        self._prefix_store.load(self.cache, slot, blocks)

    def save_prefix(self, slot: int, first_block: int, blocks: Sequence[int]) -> None:
        """Copy the slot's block-aligned positions from ``first_block`` on into the cache's ``blocks``."""
        if self._prefix_store is None:
            raise EngineError("This core keeps no prefix cache.")
        self._prefix_store.save(self.cache, slot, first_block, blocks)

    @property
    def capacity(self) -> int:
        return self.cache.capacity

    @property
    def free_slots(self) -> int:
        return self.cache.free_slots

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
        rows = self.cache.rows_of(decode_slots)
        lengths = self.cache.lengths_of(rows)
        for slot in decode_slots:
            self.cache.check_room(slot, 1)
        # (cache row, start in prompt_tokens, length, first position in the slot)
        segments: list[tuple[int, int, int, int]] = []
        prompt_tokens: list[int] = []
        positions, last = list(lengths), list(range(len(rows)))
        pooled_spans: list[tuple[int, int]] = []  # (start in the pass's tokens, length)
        start = 0
        prefill_rows = self.cache.rows_of([*prefill_slots, *pool_slots])
        for slot, row, prompt, offset in zip(
            [*prefill_slots, *pool_slots],
            prefill_rows,
            [*prompts, *pool_prompts],
            self.cache.lengths_of(prefill_rows),
            strict=True,
        ):
            # A slot that already holds positions (a cached prefix, an earlier chunk) is extended from there.
            self.cache.check_room(slot, len(prompt))
            segments.append((row, start, len(prompt), offset))
            prompt_tokens.extend(prompt)
            positions.extend(range(offset, offset + len(prompt)))
            if len(segments) <= len(prefill_slots):
                last.append(len(rows) + start + len(prompt) - 1)
            else:
                pooled_spans.append((len(rows) + start, len(prompt)))
            start += len(prompt)
        self.cache.ensure_initialised(max([*(n + 1 for n in lengths), *(o + n for _, _, n, o in segments)]))
        all_tokens = torch.cat([tokens.to(torch.long).cpu(), torch.tensor(prompt_tokens, dtype=torch.long)])
        if self._fused_applies(len(positions), max(positions, default=0) + 1):
            # Every token at its own (cache row, position): decode rows and whole prompts in one pass.
            token_rows = rows + [row for row, _, length, _ in segments for _ in range(length)]
            hidden = self._step_fused(all_tokens, token_rows, positions)
        else:
            attention = MixedAttention(
                DecodeAttention.plan(self.cache, rows, lengths, self.weights.scale) if rows else None,
                PrefillAttention(self.cache, segments, self.weights.scale) if segments else None,
                len(rows),
            )
            hidden = self._forward(all_tokens, positions, attention)  # [N, E]
        self.cache.advance(rows)
        for row, _, length, _ in segments:
            self.cache.advance([row], length)
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
            row = self.cache.rows_of([slot])[0]
            self.cache.check_room(slot, len(tokens))
            self.cache.ensure_initialised(len(tokens))
            attention = PrefillAttention(self.cache, [(row, 0, len(tokens))], self.weights.scale)
            return self.weights.lm_head(self._forward(tokens, range(len(tokens)), attention))
        finally:
            self.free([slot])


    def _fused_applies(self, batch: int, live: int) -> bool:
        supported = self._arch.fused_supported
        return self._fused is not None and supported is not None and supported(self.weights, batch, live)

    def _step_fused(self, tokens: torch.Tensor, rows: list[int], positions: list[int]) -> torch.Tensor:
        """tokens [N] at positions [N] of cache rows [N] -> final hidden states [N, E]."""
        assert self._fused is not None and self._arch.step_fused is not None
        return self._arch.step_fused(
            self.weights,
            tokens,
            torch.tensor(positions, dtype=torch.long),
            torch.tensor(rows, dtype=torch.long),
            self.cache,
            self._fused,
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
            "dtype": str(self._dtype).removeprefix("torch."),
            "fused_kernels": self._fused is not None,
            "prefix_cache_blocks": 0 if self._prefix_store is None else self._prefix_store.blocks,
            "prefix_block_size": 0 if self._prefix_store is None else self._prefix_store.block_size,
            "prefix_cache_bytes": 0 if self._prefix_store is None else self._prefix_store.reserved_bytes,
            **({"fused_kernels_off": self._fused_off} if self._fused_off else {}),
        }


def _linears(weights: ModelWeights) -> list[Linear]:
    found = [weights.lm_head]
    for layer in weights.layers:
        found.extend(value for value in vars(layer).values() if hasattr(value, "kernel_for"))
    return found
