"""Model cores: what computes logits for the slots the scheduler hands them.

The contract (``ModelCore``) is small on purpose, so the scheduler in ``engine/scheduler.py`` never
knows which core runs:

* ``allocate() -> slot`` and ``free(slots)``: a slot holds one sequence's cached keys/values;
* ``prefill(slots, prompts) -> logits [B, V]``: write whole prompts into fresh slots;
* ``decode(slots, tokens) -> logits [B, V]``: one new token for each slot;
* ``step(decode_slots, tokens, prefill_slots, prompts)``: both at once, in one forward pass where the
  core can (what the scheduler calls every iteration);
* ``step_pooled(..., pool_slots, pool_prompts)``: ``step`` plus prefill-only inputs (embeddings) whose
  mean final hidden states come back instead of logits;
* ``slots_in_order()``: the order in which ``decode`` runs without copying the cache;
* ``free_blocks``, ``total_blocks`` and ``blocks_needed(decode_slots, prompt_lengths)``: the paged KV
  cache's blocks (what admission and preemption go by; a core without a block pool reports 0 total and
  never needs one);
* ``score(tokens) -> logits [L, V]``: every position of one sequence (prompt log-probabilities, echo).

``build_core`` picks the decode core of this package where an architecture module of ``decoder.py``'s
registry runs the model (Llama, Mistral, Qwen2, Qwen3, Phi-3, GPT-2) and the transformers core
(``hf.py``) for anything else; the start-up log names the core and why.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import logging
import os
import re
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import PreTrainedModel

from textgen.engine.core.activations import (
    apply_block_outliers,
    calibration_tokens,
    input_ranges,
    measure_block_outliers,
)
from textgen.engine.core.calibrate import Probe, machine_key, plan_for, refine_crossover
from textgen.engine.core.decoder import Architecture, DecodeCore, StepOutput, _linears, architecture_for
from textgen.engine.core.fused import FusedKernels, build_fused_kernels
from textgen.engine.core.gguf_blocks import Int4Blocks, cached_q4_1_blocks
from textgen.engine.core.hf import TransformersCore
from textgen.engine.core.weights import GGUF, LinearFactory, WeightPlan
from textgen.engine.types import DEFAULT_PROMPT_TOKENS
from textgen.errors import ConfigError, EngineError
from textgen.loader import LoadedModel, cpu_supports_bf16, gguf_fingerprint

logger = logging.getLogger(__name__)

PLAN_CACHE = "weight-formats.json"
BLOCK_CALIBRATION_TOKENS = 128  # tokens that find a GGUF model's outlier channels at start-up


class ModelCore(Protocol):
    name: str

    @property
    def capacity(self) -> int: ...  # positions one slot holds (prompt + generated)

    @property
    def free_slots(self) -> int: ...

    def allocate(self) -> int: ...

    def free(self, slots: Sequence[int]) -> None: ...

    @property
    def free_blocks(self) -> int: ...

    @property
    def total_blocks(self) -> int: ...

    def blocks_needed(self, decode_slots: Sequence[int], prompt_lengths: Sequence[int]) -> int: ...

    def slots_in_order(self) -> list[int]: ...

    def prefill(self, slots: Sequence[int], prompts: Sequence[Sequence[int]]) -> torch.Tensor: ...

    def decode(self, slots: Sequence[int], tokens: torch.Tensor) -> torch.Tensor: ...

    def step(
        self,
        decode_slots: Sequence[int],
        tokens: torch.Tensor,
        prefill_slots: Sequence[int],
        prompts: Sequence[Sequence[int]],
    ) -> torch.Tensor: ...

    def score(self, tokens: Sequence[int]) -> torch.Tensor: ...  # logits after every position [L, V]

    def step_pooled(
        self,
        decode_slots: Sequence[int],
        tokens: torch.Tensor,
        prefill_slots: Sequence[int],
        prompts: Sequence[Sequence[int]],
        pool_slots: Sequence[int],
        pool_prompts: Sequence[Sequence[int]],
    ) -> StepOutput: ...

    def describe(self) -> dict[str, Any]: ...

    # Whether ``step`` may prefill a slot that already holds positions (a cached prefix, an earlier
    # chunk of the same prompt): the prompt then continues from there.
    @property
    def extends(self) -> bool: ...

    # The prefix cache over the core's KV blocks (0: the core keeps none): positions per block, and
    # holding, sharing into a fresh slot, releasing and naming full blocks by their content keys.
    @property
    def prefix_block_size(self) -> int: ...

    def hold_prefix(self, keys: Sequence[Hashable]) -> list[int]: ...

    def release_blocks(self, blocks: Sequence[int]) -> None: ...

    def load_prefix(self, slot: int, blocks: Sequence[int]) -> None: ...

    def publish_prefix(self, slot: int, keys: Sequence[Hashable]) -> None: ...

    # Whether the keys and values a decode step writes for a token are bit for bit those a prefill of the
    # same history writes: then a finished sequence's generated blocks may be named for the prefix cache
    # too (a chat's next turn resends the answer), and outputs stay identical with the cache on and off.
    @property
    def decode_kv_is_prefill_kv(self) -> bool: ...


@dataclass(frozen=True)
class CoreOptions:
    core: str = "auto"  # TEXTGEN_CORE
    weights: str = "auto"  # TEXTGEN_WEIGHTS
    slots: int = 64  # TEXTGEN_MAX_RUNNING
    # Most positions one sequence holds: TEXTGEN_MAX_PROMPT_TOKENS + TEXTGEN_MAX_NEW_TOKENS_LIMIT, or (None)
    # the model's context.
    positions: int | None = None
    kv_cache_memory: int | None = None  # TEXTGEN_KV_CACHE_MEMORY (bytes); None: a share of available memory
    kv_cache_memory_fraction: float = 0.25  # TEXTGEN_KV_CACHE_MEMORY_FRACTION
    kv_block_size: int = 32  # TEXTGEN_KV_BLOCK_SIZE
    cache_dir: Path | None = None  # TEXTGEN_CACHE_DIR: int4 blocks and weight-format measurements
    fused: bool = True  # TEXTGEN_FUSED_KERNELS: decode steps and w8a8 rescaling through fused.c where it builds


def build_core(loaded: LoadedModel, options: CoreOptions) -> ModelCore:
    if loaded.weights_released:
        raise EngineError("This model's weights were released to a running core; load the model again.")
    default_positions = loaded.context_length or DEFAULT_PROMPT_TOKENS + DEFAULT_NEW_TOKENS_LIMIT
    positions = options.positions if options.positions is not None else default_positions
    capacity = min(positions, loaded.context_length or positions)
    arch, reason = architecture_for(loaded.model, capacity)
    if loaded.gguf_weights is not None and (options.core == "transformers" or arch is None):
        # Read directly from GGUF, but only transformers can run it: it needs float weights in the model.
        logger.info("De-quantizing %s's weights for the transformers core", loaded.name)
        loaded.gguf_weights.materialize(loaded.model, loaded.dtype)
    if options.core == "transformers" or arch is None:
        if options.core == "textgen":
            raise ConfigError(f"TEXTGEN_CORE=textgen cannot run this model ({reason}); use TEXTGEN_CORE=auto.")
        why = reason if arch is None else f"TEXTGEN_CORE=transformers, though {reason}"
        if options.weights not in ("auto", "float"):
            raise ConfigError(
                f"TEXTGEN_WEIGHTS={options.weights} needs the textgen core, which cannot run this model "
                f"({why}); use TEXTGEN_WEIGHTS=auto."
            )
        logger.info("Model core: transformers (%s)", why)
        return TransformersCore(loaded.model, int(loaded.tokenizer.pad_token_id), options.slots, capacity)
    fused, fused_off = fused_kernels_for(options, loaded.device)
    if loaded.gguf_weights is not None:
        return _core_from_gguf(loaded, arch, reason, options, capacity, fused, fused_off)
    blocks = gguf_int4_blocks(loaded, arch.name, options)
    plan, _ = plan_for(
        options.weights,
        device=loaded.device,
        compute_dtype=loaded.dtype,
        has_int4_blocks=bool(blocks),
        bf16_fast=cpu_supports_bf16(),
        probe=lambda: first_layer_probe(loaded.model),
        max_batch=options.slots,
        cache_file=None if options.cache_dir is None else options.cache_dir / PLAN_CACHE,
        fused=fused,
    )
    factory = LinearFactory(
        plan,
        loaded.dtype,
        loaded.device,
        blocks if "int4" in plan.formats else None,
        input_ranges=lambda: input_ranges(loaded.model, loaded.tokenizer),
        fused=fused,
    )
    core = DecodeCore(
        loaded.model, arch, plan, factory, **_cache_sizing(options, capacity), fused=fused, fused_off=fused_off
    )
    if options.weights == "auto" and len(plan.tiers) == 2:
        key = "|".join([machine_key(), loaded.name, plan.describe(), f"fused={fused.build_key if fused else 'off'}"])
        cache_file = None if options.cache_dir is None else options.cache_dir / PLAN_CACHE
        core.set_plan(refine_crossover(plan, core.time_decode_steps, options.slots, cache_file, key))
    _log_core(core, reason)
    return core


def _cache_sizing(options: CoreOptions, capacity: int) -> dict[str, Any]:
    """DecodeCore's KV cache arguments: TEXTGEN_KV_CACHE_MEMORY, else a fraction of the available memory."""
    kv_memory = options.kv_cache_memory
    if kv_memory is None:
        kv_memory = int(available_memory() * options.kv_cache_memory_fraction)
    return {
        "slots": options.slots,
        "capacity": capacity,
        "kv_memory": kv_memory,
        "kv_memory_is_default": options.kv_cache_memory is None,
        "block_size": options.kv_block_size,
    }


def _core_from_gguf(
    loaded: LoadedModel,
    arch: Architecture,
    reason: str,
    options: CoreOptions,
    capacity: int,
    fused: FusedKernels | None,
    fused_off: str,
) -> DecodeCore:
    """The decode core over weights read directly from a GGUF file: TEXTGEN_WEIGHTS=auto (or int4) keeps
    every projection in the file's blocks (Q4 kernel for 4-bit ones, the 8-bit block kernel for the
    rest); float, bf16 and int8 build from their de-quantized values; w8a8 (which measures activations
    with the transformers model) is served by floats."""
    assert loaded.gguf_weights is not None
    fmt = {"auto": GGUF, "int4": GGUF, "float": str(loaded.dtype).removeprefix("torch."), "bf16": "bfloat16"}
    plan = WeightPlan.single(fmt.get(options.weights, options.weights))
    factory = LinearFactory(plan, loaded.dtype, loaded.device, fused=fused, gguf=loaded.gguf_weights)
    core = DecodeCore(
        loaded.model, arch, plan, factory, **_cache_sizing(options, capacity), fused=fused, fused_off=fused_off
    )
    if fmt.get(options.weights) == GGUF:
        _add_outliers(core, loaded, options, capacity)
    converted = loaded.gguf_weights.converted
    if converted:
        logger.info(
            "GGUF blocks converted on reading (exactly) to the 8-bit block format: %s",
            ", ".join(f"{count} {name}" for name, count in sorted(converted.items())),
        )
    if GGUF in factory.fallbacks:
        logger.warning("Some GGUF blocks have no kernel here (fused.c or AVX-512 VNNI missing): floats serve them")
    _log_core(core, reason)
    return core


def _add_outliers(core: DecodeCore, loaded: LoadedModel, options: CoreOptions, capacity: int) -> None:
    """The block kernels' outlier input channels: measured once per file over a short text on the core
    itself (the transformers model has no weights to run), then cached beside the plan."""
    assert loaded.source_file is not None
    linears = _linears(core.weights)
    cache = None
    if options.cache_dir is not None:
        cache = options.cache_dir / f"outliers-{loaded.source_file.stem}-{gguf_fingerprint(loaded.source_file)}.json"
    if cache is not None and cache.is_file():
        with contextlib.suppress(OSError, ValueError, TypeError):
            apply_block_outliers(linears, json.loads(cache.read_text()))
            return
    started = time.perf_counter()
    tokens = calibration_tokens(loaded.tokenizer, min(BLOCK_CALIBRATION_TOKENS, capacity))
    channels = measure_block_outliers(linears, core.score, tokens)
    apply_block_outliers(linears, channels)
    logger.info(
        "Outlier input channels of %d block kernels measured over %d tokens in %.1fs",
        len(channels), len(tokens), time.perf_counter() - started,
    )
    if cache is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            staging = cache.with_name(cache.name + f".tmp-{os.getpid()}")
            staging.write_text(json.dumps(channels))
            staging.replace(cache)
        except OSError as error:
            logger.warning("Could not cache outlier channels at %s (%s); the next start measures again", cache, error)


def _log_core(core: DecodeCore, reason: str) -> None:
    info = core.describe()
    logger.info(
        "Model core: %s (%s); weights %s (%.0f MiB); KV cache %d blocks x %d positions (%.0f MiB reserved, "
        "touched as used), up to %d sequences of up to %d positions each; fused decode kernels %s%s",
        info["core"],
        reason,
        info["weights"],
        info["weights_bytes"] / 2**20,
        info["kv_blocks"],
        info["kv_block_size"],
        info["kv_cache_bytes"] / 2**20,
        info["slots"],
        info["positions_per_slot"],
        "on" if info["fused_kernels"] else "off",
        f"; {', '.join(sorted(core.fallbacks))} unavailable here, float used instead" if core.fallbacks else "",
    )


def sequence_positions(max_prompt_tokens: int | None, max_new_tokens_limit: int) -> int | None:
    """CoreOptions.positions from the limits: prompt plus output, or None (the model's context) by default."""
    return None if max_prompt_tokens is None else max_prompt_tokens + max_new_tokens_limit


DEFAULT_NEW_TOKENS_LIMIT = 1024  # TEXTGEN_MAX_NEW_TOKENS_LIMIT's default, for a model that states no context


def available_memory() -> int:
    """Bytes this process could still use: the kernel's MemAvailable, within a cgroup (container) limit."""
    available = _meminfo_available()
    limit = _cgroup_room()
    return min(available, limit) if limit is not None else available


def _meminfo_available() -> int:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def _cgroup_room() -> int | None:
    """The cgroup v2 memory limit minus what the cgroup uses now, where one is set."""
    with contextlib.suppress(OSError, ValueError):
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            return max(0, int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text().strip()))
    return None


def fused_kernels_for(options: CoreOptions, device: torch.device) -> tuple[FusedKernels | None, str]:
    """fused.c's library where it applies, else None and why (for describe(): /ready, the bench header)."""
    if not options.fused:
        return None, "TEXTGEN_FUSED_KERNELS=false"
    if device.type != "cpu":
        return None, f"CPU only (the model runs on {device.type})"
    build = build_fused_kernels()
    return build.kernels, build.problem


def release_source_weights(loaded: LoadedModel, core: ModelCore) -> int:
    """Free the transformers model's projection weights once this package's core has its own copies.

    The core keeps what it computes with (packed, quantized); the loaded model's linear layers are then a
    second copy (~210 MB for SmolLM2 in bf16). Embeddings and norms stay (the core may share them), and
    so does the output layer (tied to the embeddings in most small models). Afterwards the transformers
    model cannot run, so only the engine that owns ``loaded`` calls this, and ``build_core`` refuses it.
    Returns the bytes released.
    """
    if not isinstance(core, DecodeCore):
        return 0
    keep = output_embeddings(loaded.model)
    freed = 0
    for module in loaded.model.modules():
        weight = getattr(module, "weight", None)
        is_projection = isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"
        if module is keep or not is_projection or not isinstance(weight, torch.Tensor) or not weight.numel():
            continue
        freed += weight.numel() * weight.element_size()
        module.weight = torch.nn.Parameter(weight.new_empty(0), requires_grad=False)
    loaded.weights_released = True
    _return_free_memory_to_the_system()
    logger.info("Released the loaded model's projection weights (%.0f MiB): the core holds its own", freed / 2**20)
    return freed


def _return_free_memory_to_the_system() -> None:
    """glibc keeps freed blocks inside its heap; malloc_trim hands the free pages back to the kernel, so
    the released weights leave the resident set instead of waiting there for reuse."""
    with contextlib.suppress(OSError, AttributeError, TypeError):  # not glibc: later allocations reuse it
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)


def gguf_int4_blocks(loaded: LoadedModel, arch: str, options: CoreOptions) -> dict[str, Int4Blocks]:
    """The source file's own 4-bit blocks, when it is a Q4 GGUF and int4 may be used (else empty)."""
    gguf = loaded.source_file
    if gguf is None or arch != "llama" or options.weights not in ("auto", "int4") or loaded.device.type != "cpu":
        return {}
    config = loaded.model.config
    cache_dir = options.cache_dir or gguf.parent
    return cached_q4_1_blocks(gguf, cache_dir, config.num_attention_heads, config.num_key_value_heads)


FIRST_LAYER = re.compile(r"(^|\.)(layers|h)\.0\.")


def output_embeddings(model: PreTrainedModel) -> torch.nn.Module | None:
    """The model's output layer (often tied to its input embeddings), None where it has none."""
    # transformers leaves get_output_embeddings() unannotated; it returns an nn.Module or None.
    found: torch.nn.Module | None = model.get_output_embeddings()  # type: ignore[no-untyped-call]
    return found


def first_layer_probe(model: PreTrainedModel) -> Probe:
    """Every projection weight of the first transformer layer ([out, in]) and the output head."""
    weights = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not FIRST_LAYER.search(name + ".") or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            continue
        is_conv1d = type(module).__name__ == "Conv1D"  # GPT-2 stores [in, out]
        weights.append((weight.t() if is_conv1d else weight).detach())
    config = model.config.get_text_config()
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None) or 1
    head = getattr(output_embeddings(model), "weight", None)
    if not isinstance(head, torch.Tensor):
        raise TypeError(f"{type(model).__name__} has no output layer weight to probe")
    return Probe(weights, head.detach(), int(layers))
