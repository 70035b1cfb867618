"""Sliding-window models served batched: the transformers fallback core at C=8 with prompts of different
lengths, longer than the window, and rows joining and leaving mid-flight (Gemma 3 failed here with an SDPA
mask size error before)."""

from __future__ import annotations

import pytest

from tests.support.tiny_sliding import (
    WINDOW,
    decode_with_joiners,
    greedy_alone,
    prompts_of_lengths,
    tiny_gemma3,
    tiny_mistral,
)
from textgen.engine.core.hf import TransformersCore

LENGTHS = (3, 9, 5, 14, 2, 7, 11, 1)  # eight prompts, several longer than the window


@pytest.mark.parametrize("build", [tiny_gemma3, tiny_mistral], ids=["gemma3", "mistral"])
def test_the_transformers_core_serves_sliding_window_models_batched(build: object) -> None:
    model = build()  # type: ignore[operator]
    prompts = prompts_of_lengths(*LENGTHS)
    assert max(LENGTHS) > WINDOW
    core = TransformersCore(model, pad_id=0, slots=8, capacity=64)
    # four more join at step 2 while the first four decode (one step does both); one leaves at step 6
    order, generated = decode_with_joiners(core, prompts, steps=10, leave_at=6)
    for index, slot in enumerate(order):
        expected = greedy_alone(model, prompts[index], len(generated[slot]))
        assert generated[slot] == expected, f"prompt {index} (length {LENGTHS[index]})"
    assert max(len(g) for g in generated.values()) + max(LENGTHS) > 2 * WINDOW
