"""Sliding-window models served batched: the transformers fallback core at C=8 with prompts of different
lengths, longer than the window, and rows joining and leaving mid-flight (Gemma 3 failed here with an SDPA
mask size error before)."""

from __future__ import annotations

import pytest
import torch

from tests.support.tiny_sliding import WINDOW, greedy_alone, prompts_of_lengths, tiny_gemma3, tiny_mistral
from textgen.engine.core.hf import TransformersCore

LENGTHS = (3, 9, 5, 14, 2, 7, 11, 1)  # eight prompts, several longer than the window


@pytest.mark.parametrize("build", [tiny_gemma3, tiny_mistral], ids=["gemma3", "mistral"])
def test_the_transformers_core_serves_sliding_window_models_batched(build: object) -> None:
    model = build()  # type: ignore[operator]
    prompts = prompts_of_lengths(*LENGTHS)
    assert max(LENGTHS) > WINDOW
    core = TransformersCore(model, pad_id=0, slots=8, capacity=64)
    generated: dict[int, list[int]] = {}
    first = [core.allocate() for _ in range(4)]
    tokens = core.prefill(first, prompts[:4]).argmax(-1)
    running = list(first)
    for slot, token in zip(running, tokens.tolist(), strict=True):
        generated[slot] = [token]
    for step in range(10):
        if step == 2:  # four more join while the first four decode: one step does both
            joining = [core.allocate() for _ in range(4)]
            tokens = core.step(running, tokens, joining, prompts[4:]).argmax(-1)
            running += joining
        elif step == 6:  # one leaves mid-flight; the rest keep their caches
            core.free([running[1]])
            kept = [i for i in range(len(running)) if i != 1]
            running = [running[i] for i in kept]
            tokens = core.decode(running, tokens[kept]).argmax(-1)
        else:
            tokens = core.decode(running, tokens).argmax(-1)
        for slot, token in zip(running, tokens.tolist(), strict=True):
            generated.setdefault(slot, []).append(token)
    order = first + joining
    for index, slot in enumerate(order):
        expected = greedy_alone(model, prompts[index], len(generated[slot]))
        assert generated[slot] == expected, f"prompt {index} (length {LENGTHS[index]})"
    assert max(len(g) for g in generated.values()) + max(LENGTHS) > 2 * WINDOW
    assert torch.is_tensor(tokens)
