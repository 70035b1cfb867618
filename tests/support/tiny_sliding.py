"""Tiny random sliding-window models (Gemma 3, Mistral), built at test time, for comparing the cores with
transformers in float32. Windows are a few positions wide so ordinary test prompts outgrow them."""

from __future__ import annotations

from typing import Any

import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, MistralConfig, MistralForCausalLM

WINDOW = 5


def tiny_gemma3(seed: int = 0, *, window: int = WINDOW, kv_heads: int = 1) -> Gemma3ForCausalLM:
    """Four layers, local (sliding) ones interleaved with a global one, each kind with its own rope base;
    norm weights random (transformers initialises Gemma's to zero, which would hide a missing 1 + w)."""
    config = Gemma3TextConfig(
        vocab_size=160,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        head_dim=32,
        sliding_window=window,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        query_pre_attn_scalar=24,
        max_position_embeddings=512,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
        },
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
    )
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.uniform_(-0.5, 0.5)
    return model


def tiny_mistral(seed: int = 0, *, window: int = WINDOW) -> MistralForCausalLM:
    config = MistralConfig(
        vocab_size=160,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=window,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
    )
    torch.manual_seed(seed)
    return MistralForCausalLM(config).eval()


def prompts_of_lengths(*lengths: int, vocab: int = 160) -> list[list[int]]:
    """Deterministic prompts (token ids 3.. so no special token) of the given lengths."""
    return [[3 + (7 * i + 11 * n) % (vocab - 3) for i in range(n)] for n in lengths]


def decode_with_joiners(
    core: Any, prompts: list[list[int]], steps: int, leave_at: int | None = None
) -> tuple[list[int], dict[int, list[int]]]:
    """Greedy decoding on a core (DecodeCore or TransformersCore): prompts[:4] prefilled, then ``steps`` steps;
    at step 2 prompts[4:] join in the same pass that decodes the first four, and at ``leave_at`` the second
    running sequence is freed (the rest keep their caches). -> the slots in prompt order, each slot's tokens."""
    generated: dict[int, list[int]] = {}
    first = [core.allocate() for _ in range(4)]
    tokens = core.prefill(first, prompts[:4]).argmax(-1)
    running = list(first)
    for slot, token in zip(running, tokens.tolist(), strict=True):
        generated[slot] = [token]
    joining: list[int] = []
    for step in range(steps):
        if step == 2:
            joining = [core.allocate() for _ in prompts[4:]]
            tokens = core.step(running, tokens, joining, prompts[4:]).argmax(-1)
            running += joining
        elif step == leave_at:
            core.free([running[1]])
            kept = [i for i in range(len(running)) if i != 1]
            running = [running[i] for i in kept]
            tokens = core.decode(running, tokens[kept]).argmax(-1)
        else:
            tokens = core.decode(running, tokens).argmax(-1)
        for slot, token in zip(running, tokens.tolist(), strict=True):
            generated.setdefault(slot, []).append(token)
    return first + joining, generated


@torch.inference_mode()
def greedy_alone(model: torch.nn.Module, prompt: list[int], steps: int) -> list[int]:
    """transformers' own forward over the whole sequence at every step (no cache): the reference."""
    ids, out = list(prompt), []
    for _ in range(steps):
        token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        out.append(token)
        ids.append(token)
    return out
