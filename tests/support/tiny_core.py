"""Tiny model cores for the engine's unit tests: a random two-layer Llama, a DecodeCore over a copy of it, and
fused.c built into the test's own folder (so a test never depends on, or writes, the user's kernel cache)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from textgen.engine.core.decoder import DecodeCore, architecture_for
from textgen.engine.core.fused import FusedKernels, load_fused_kernels
from textgen.engine.core.weights import LinearFactory, WeightPlan


def build_kernels(folder: Path) -> FusedKernels:
    """fused.c compiled into folder; fails the test (never skips it) where it cannot be built."""
    built = load_fused_kernels(folder)
    assert built is not None, "the fused kernels did not build (is gcc installed?)"
    return built


def tiny_llama_model(seed: int = 0, vocab_size: int = 100) -> LlamaForCausalLM:
    """Vocabulary 100 (int4 needs a multiple of 16), width 64, 2 layers, 4 query heads over 2 key/value heads,
    tied embeddings."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=True,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def tiny_core(
    model: torch.nn.Module, dtype: torch.dtype, fused: FusedKernels | None = None, *, slots: int = 4,
    capacity: int = 64, weights: str | None = None, **core_options: Any,
) -> DecodeCore:  # fmt: skip
    """A DecodeCore over a copy of model in dtype, every layer in one format: weights ("int4", ...), by default
    the float format of dtype; fused: the fused step's kernels (None: PyTorch's operators). core_options go to
    DecodeCore (block_size, ...)."""
    arch, reason = architecture_for(model)
    assert arch is not None, reason
    plan = WeightPlan.single(weights or str(dtype).removeprefix("torch."))
    factory = LinearFactory(plan, dtype, torch.device("cpu"))
    return DecodeCore(
        copy.deepcopy(model).to(dtype), arch, plan, factory, slots=slots, capacity=capacity, fused=fused,
        **core_options,
    )  # fmt: skip
