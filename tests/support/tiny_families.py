"""Tiny random decoders of each family the own core runs (Llama with its rope scalings, Mistral, Qwen2, Qwen3,
Phi-3), built at test time like the tiny GPT-2, and a saver that writes one as a model folder.

Every weight is random, norm weights and biases included (transformers initialises those to 1 and 0), so a
norm or bias a module forgot shows up in its logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from tests.support.tiny_model import build_tokenizer

VOCAB = 128
LLAMA3_ROPE = {
    "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
YARN_ROPE = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16}
# Phi-3-mini-128k's kind: per-frequency factors, the short ones up to original_max_position_embeddings.
LONGROPE = {
    "rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0 + 0.25 * i for i in range(8)],
    "long_factor": [4.0 + i for i in range(8)],
}


@dataclass(frozen=True)
class Family:
    module: str  # the architecture module expected to run it
    model_class: type[PreTrainedModel]
    config_class: type[Any]
    options: dict[str, Any] = field(default_factory=dict)


FAMILIES = {
    "llama": Family("llama", LlamaForCausalLM, LlamaConfig),
    "llama3-rope": Family("llama", LlamaForCausalLM, LlamaConfig, {"rope_parameters": LLAMA3_ROPE}),
    "llama-yarn": Family("llama", LlamaForCausalLM, LlamaConfig, {"rope_parameters": YARN_ROPE}),
    # Windows narrower than the tests' prompts plus their generated tokens (Phi-3-mini-4k's is 2,047)
    "mistral": Family("llama", MistralForCausalLM, MistralConfig, {"sliding_window": 8}),
    "qwen2": Family("qwen2", Qwen2ForCausalLM, Qwen2Config),
    "qwen2-window": Family(
        "qwen2", Qwen2ForCausalLM, Qwen2Config,
        {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 0},  # every layer slides
    ),
    "qwen3": Family("qwen3", Qwen3ForCausalLM, Qwen3Config, {"head_dim": 32}),  # as Qwen3: D != E / Hq
    "phi3": Family("phi3", Phi3ForCausalLM, Phi3Config),
    "phi3-window": Family("phi3", Phi3ForCausalLM, Phi3Config, {"sliding_window": 8}),
    "phi3-longrope": Family(
        "phi3", Phi3ForCausalLM, Phi3Config, {"rope_parameters": LONGROPE, "original_max_position_embeddings": 64}
    ),
}


def tiny(name: str, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A 2-layer model of the family (E=64, 4 query heads over 2 KV heads, D=16 unless set), every weight random."""
    family = FAMILIES[name]
    config = family.config_class(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, initializer_range=0.15,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
        **{**family.options, **overrides},
    )
    torch.manual_seed(seed)
    model: PreTrainedModel = family.model_class(config)
    model.train(False)
    with torch.no_grad():
        for name_, param in model.named_parameters():
            if "norm" in name_:
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
            elif name_.endswith("bias"):
                param.copy_(0.3 * torch.randn_like(param))
    return model


def save_tiny_family(folder: Path, name: str) -> Path:
    """The family's tiny model with the tiny GPT-2's tokenizer (its vocabulary), saved as a model folder."""
    tokenizer = build_tokenizer()
    model = tiny(name)
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
