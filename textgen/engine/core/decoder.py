"""The decode core: one of the architecture modules (Llama, Qwen2, Qwen3, Phi-3, Gemma 3, GPT-2) over a paged
KV cache.

It only computes logits for the slots it is given; who runs, when, and for how long is the
scheduler's business (``engine/scheduler.py``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

import textgen.engine.core.gemma3 as gemma3
import textgen.engine.core.gpt2 as gpt2
import textgen.engine.core.llama as llama
import textgen.engine.core.phi3 as phi3
import textgen.engine.core.qwen2 as qwen2
import textgen.engine.core.qwen3 as qwen3
from textgen.engine.core.fused import FusedKernels
from textgen.engine.core.kv_cache import PagedKVCache
from textgen.engine.core.layers import Attention, DecodeAttention, MixedAttention, PrefillAttention
from textgen.engine.core.linear import Linear
from textgen.engine.core.weights import UNBOUNDED, LinearFactory, WeightPlan
from textgen.engine.pooling import mean_pool
from textgen.errors import ConfigError, EngineError

logger = logging.getLogger(__name__)

# Weight formats whose product gives an input row the same bits whatever other rows share the call (int4:
# PyTorch's int4pack kernel; w8a8: integer products, rows quantized and rescaled one by one).
ROW_EXACT_FORMATS = frozenset({"int4", "w8a8"})


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
    name: str  # the core is called textgen-<name>
    model_types: tuple[str, ...]  # transformers' config.model_type values the module reads
    # why the module cannot run this model in slots of so many positions (None: it can)
    unsupported_reason: Callable[[Any, int], str | None]
    build: Callable[..., ModelWeights]
    forward: Callable[[Any, torch.Tensor, torch.Tensor, Attention], torch.Tensor]
    # A model step through fused.c (weights, tokens, positions, rows of tables, cache, kernels, tables=block
    # tables [R, W]), and when it applies
    # (weights, tokens, longest live length); None where the architecture has none.
    step_fused: Callable[..., torch.Tensor] | None = None
    fused_supported: Callable[[Any, int, int], bool] | None = None


def _rotary_decoder(name: str, module: Any) -> Architecture:
    """A family over llama.py's decoder: its own checks and weight mapping, the shared forward and fused step."""
    return Architecture(
        name, module.MODEL_TYPES, module.unsupported_reason, module.build, llama.forward, llama.step_fused,
        llama.fused_supported,
    )


# The registry: one entry per architecture module, found by the checkpoint's model type.
ARCHITECTURES = (
    _rotary_decoder("llama", llama),
    _rotary_decoder("qwen2", qwen2),
    _rotary_decoder("qwen3", qwen3),
    _rotary_decoder("phi3", phi3),
    Architecture(
        "gemma3", gemma3.MODEL_TYPES, lambda model, _positions: gemma3.unsupported_reason(model), gemma3.build,
        gemma3.forward, gemma3.step_fused, gemma3.fused_supported,
    ),
    Architecture("gpt2", gpt2.MODEL_TYPES, gpt2.unsupported_reason, gpt2.build, gpt2.forward),
)
MODULES = {model_type: arch for arch in ARCHITECTURES for model_type in arch.model_types}


def architecture_for(model: Any, positions: int | None = None) -> tuple[Architecture | None, str]:
    """The module that runs this model in slots of ``positions`` positions (default: its whole context), and
    why; or None and why not. The reason is for the start-up log, which says which core runs and why."""
    config = model.config
    model_type = str(getattr(config, "model_type", ""))
    arch = MODULES.get(model_type)
    if arch is None:
        known = ", ".join(sorted(MODULES))
        return None, f"model type {model_type!r} has no textgen module (textgen runs {known})"
    if positions is None:
        positions = int(getattr(config, "max_position_embeddings", 0) or getattr(config, "n_positions", 0) or 2048)
    reason = arch.unsupported_reason(model, positions)
    if reason is not None:
        return None, f"model type {model_type!r}: the {arch.name} module cannot run {reason}"
    return arch, f"model type {model_type!r} runs on the {arch.name} module"


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
        self.cache.sync_table(slot)

    def publish_prefix(self, slot: int, keys: Sequence[Hashable]) -> None:
        """Name the sequence's first full blocks by ``keys`` so later prompts find them (a block already
        named keeps its name; the first copy of a content is the one found)."""
        table = self.cache.table(slot)
        full = min(len(keys), table.length // self.cache.block_size)
        for block, key in zip(table.blocks[:full], keys[:full], strict=True):
            self.cache.pool.set_hash(block, key)

    @property
    def decode_kv_is_prefill_kv(self) -> bool:
        """Where every step runs fused.c's step (whose attention gives a row the same bits in any batch)
        over one weight format whose products do too, a token's keys and values do not depend on how it
        was grouped: decoded one at a time, verified with drafts or prefilled with its whole prompt.
        Measured on SmolLM2 (300-token prompt, 70 tokens decoded, verified 1-7 at a time, prefilled): int4
        and w8a8 the same bits everywhere; bfloat16 (oneDNN's product) up to 0.25 apart."""
        tiers = self.plan.tiers
        return (
            len(tiers) == 1
            and tiers[0][1] in ROW_EXACT_FORMATS
            and self._fused_applies(1, self.cache.capacity)
        )

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
        inputs = [[token] for token in tokens.tolist()] + [list(prompt) for prompt in prompts]
        return self.extend([*decode_slots, *prefill_slots], inputs, pool_slots=pool_slots, pool_prompts=pool_prompts)

    @torch.inference_mode()
    def extend(
        self,
        slots: Sequence[int],
        inputs: Sequence[Sequence[int]],
        *,
        scored: Sequence[int] | None = None,
        pool_slots: Sequence[int] = (),
        pool_prompts: Sequence[Sequence[int]] = (),
    ) -> StepOutput:
        """The general step: append each input's tokens to its slot's sequence, after the positions the slot
        already caches, all in one forward pass. Every use is a case of it: a prompt into a fresh slot
        (prefill), the rest of a prompt after a cached prefix (prefill at an offset), one token (decode), a
        token and the tokens drafted after it (speculative verification, see ``truncate``).

        ``scored[i]`` (default 1) is how many of input i's last positions come back as logits: the result's
        ``logits`` are [sum(scored), V] float32, input by input in the order given, each input's positions in
        order. ``pool_slots``/``pool_prompts`` as in ``step_pooled``."""
        counts = [1] * len(slots) if scored is None else list(scored)
        if len(inputs) != len(slots) or len(counts) != len(slots) or len(pool_prompts) != len(pool_slots):
            raise EngineError("extend() needs one input and one scored count per slot.")
        for tokens, count in zip(inputs, counts, strict=True):
            if not tokens or not 0 <= count <= len(tokens):
                raise EngineError("extend() needs non-empty inputs and 0 <= scored <= the input's length.")
        plan = _PassPlan.build(self.cache, slots, inputs, counts, pool_slots, pool_prompts)
        # Blocks first, for everyone (nothing computed yet if the pool runs short: OutOfBlocksError; a
        # sequence at its capacity: EngineError).
        for slot, tokens in zip([*slots, *pool_slots], [*inputs, *pool_prompts], strict=True):
            self.cache.reserve(slot, len(tokens))
        all_tokens = torch.tensor(plan.tokens, dtype=torch.long)
        if self._fused_applies(len(plan.positions), max(plan.positions, default=0) + 1):
            # Every token at its own (sequence, position): decode rows and whole inputs in one pass; a token's
            # row of the cache's block tables is its sequence's slot.
            hidden = self._step_fused(all_tokens, plan.token_rows, plan.positions, self.cache.block_tables)
        else:
            attention = MixedAttention(
                DecodeAttention.plan(self.cache, plan.decode_rows, plan.decode_lengths, self.weights.scale)
                if plan.decode_rows
                else None,
                PrefillAttention(self.cache, plan.segments, self.weights.scale) if plan.segments else None,
                len(plan.decode_rows),
            )
            hidden = self._forward(all_tokens, plan.positions, attention)  # [N, E]
        for slot, tokens in zip(slots, inputs, strict=True):
            self.cache.advance(slot, len(tokens))
        for slot, prompt in zip(pool_slots, pool_prompts, strict=True):
            self.cache.advance(slot, len(prompt))
        pooled = mean_pool(hidden, plan.pooled_spans)
        if not plan.scored:  # prefill-only inputs alone: no logits to compute
            return StepOutput(torch.empty((0, 0), dtype=torch.float32), pooled)
        if plan.scored != list(range(hidden.shape[0])):
            hidden = hidden.index_select(0, torch.tensor(plan.scored, dtype=torch.long, device=self._device))
        return StepOutput(self.weights.lm_head(hidden), pooled)

    def truncate(self, slot: int, length: int) -> None:
        """Forget the slot's positions from ``length`` on (the rejected drafts of a verification step): they
        are overwritten by the next tokens, and no attention reads past a sequence's length."""
        self.cache.truncate(slot, length)

    def length(self, slot: int) -> int:
        """Positions the slot caches."""
        return self.cache.length(slot)

    @property
    def uniform_rows(self) -> int:
        """The most tokens a step may carry while every product runs in the format a one-token step uses, so
        that a row's logits do not depend on how many tokens share its step (the weight plan switches formats
        by batch size, and formats round differently)."""
        first = self.plan.tiers[0][0]
        return self.cache.capacity * self.cache.slots if first == UNBOUNDED else int(first)

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


@dataclass
class _PassPlan:
    """Where every token of one ``extend`` pass goes. One new token after a cached prefix (a decode row)
    attends through the batched decode attention; every other input is a segment (written at its offset,
    attending causally over its prefix and itself). Decode rows come first in the pass, then segments, then
    the prefill-only inputs; ``scored`` maps the result's logit rows back to the caller's order."""

    rows: list[int]  # the cache row of each input, in the caller's order
    pool_rows: list[int]
    tokens: list[int] = field(default_factory=list)  # in pass order
    positions: list[int] = field(default_factory=list)
    token_rows: list[int] = field(default_factory=list)
    decode_rows: list[int] = field(default_factory=list)
    decode_lengths: list[int] = field(default_factory=list)
    # (row, start after the decode rows, length, offset)
    segments: list[tuple[int, int, int, int]] = field(default_factory=list)
    pooled_spans: list[tuple[int, int]] = field(default_factory=list)  # (start in the pass, length)
    scored: list[int] = field(default_factory=list)  # pass index of each logit row, in the caller's order

    @classmethod
    def build(
        cls,
        cache: PagedKVCache,
        slots: Sequence[int],
        inputs: Sequence[Sequence[int]],
        counts: Sequence[int],
        pool_slots: Sequence[int],
        pool_prompts: Sequence[Sequence[int]],
    ) -> _PassPlan:
        plan = cls(list(slots), list(pool_slots))  # a sequence's slot is its row of the block tables
        starts = cache.lengths_of(plan.rows)
        for slot, tokens in zip([*slots, *pool_slots], [*inputs, *pool_prompts], strict=True):
            cache.check_room(slot, len(tokens))
        decoding = [len(tokens) == 1 and start > 0 for tokens, start in zip(inputs, starts, strict=True)]
        begins = [0] * len(inputs)
        for index in [i for i, d in enumerate(decoding) if d]:
            begins[index] = len(plan.tokens)
            plan.decode_rows.append(plan.rows[index])
            plan.decode_lengths.append(starts[index])
            plan._add(inputs[index], plan.rows[index], starts[index])
        split = len(plan.tokens)
        for index in [i for i, d in enumerate(decoding) if not d]:
            begins[index] = len(plan.tokens)
            plan.segments.append((plan.rows[index], len(plan.tokens) - split, len(inputs[index]), starts[index]))
            plan._add(inputs[index], plan.rows[index], starts[index])
        for row, prompt in zip(plan.pool_rows, pool_prompts, strict=True):
            plan.pooled_spans.append((len(plan.tokens), len(prompt)))
            plan.segments.append((row, len(plan.tokens) - split, len(prompt), 0))
            plan._add(prompt, row, 0)
        for begin, tokens, count in zip(begins, inputs, counts, strict=True):
            plan.scored.extend(range(begin + len(tokens) - count, begin + len(tokens)))
        return plan

    def _add(self, tokens: Sequence[int], row: int, offset: int) -> None:
        self.tokens.extend(tokens)
        self.positions.extend(range(offset, offset + len(tokens)))
        self.token_rows.extend([row] * len(tokens))
