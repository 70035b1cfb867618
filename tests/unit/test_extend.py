"""The core's general step, ``extend``: several new tokens per sequence after its cached positions (prefill at
an offset, speculative verification), then ``truncate`` rolling back positions that were not kept. Checked
against the transformers reference on the tiny GPT-2 (PyTorch path) and, on a tiny Llama, the fused step
against decoding the same tokens one at a time."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.support.tiny_core import build_kernels, tiny_core, tiny_llama_model
from textgen.engine.core.decoder import DecodeCore
from textgen.engine.core.fused import FusedKernels
from textgen.errors import EngineError

from .test_core import make_core, reference_logits, tokenize


def every_position_reference(loaded: Any, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return loaded.model(torch.tensor([ids])).logits[0].float()  # [L, V]


def test_extending_at_an_offset_scores_every_new_position_like_the_reference(tiny_loaded: Any) -> None:
    """Prefill the first part of a prompt, then the rest in one extend() from that offset: every position's
    logits equal transformers' over the whole sequence (the offset prefill a prefix cache needs)."""
    core = make_core(tiny_loaded)
    ids = tokenize(tiny_loaded, "Once upon a time there was a robot who learned to paint")
    head, rest = ids[:5], ids[5:]
    slot = core.allocate()
    core.prefill([slot], [head])
    logits = core.extend([slot], [rest], scored=[len(rest)]).logits
    assert logits.shape[0] == len(rest) and core.length(slot) == len(ids)
    torch.testing.assert_close(logits, every_position_reference(tiny_loaded, ids)[5:], atol=1e-4, rtol=1e-4)


def test_verification_then_truncate_continues_as_if_only_the_kept_tokens_were_fed(tiny_loaded: Any) -> None:
    """Feed a token and three drafts, keep two of them (truncate), feed the next token: its logits are those
    of the sequence without the rejected drafts, so the rolled-back positions are never read."""
    core = make_core(tiny_loaded)
    ids = tokenize(tiny_loaded, "The quick brown fox")
    slot = core.allocate()
    core.prefill([slot], [ids[:-1]])
    fed = [ids[-1], 11, 12, 13]
    core.extend([slot], [fed], scored=[4])
    core.truncate(slot, len(ids) + 2)  # kept: the token and drafts 11, 12
    logits = core.decode([slot], torch.tensor([40]))[0]
    torch.testing.assert_close(logits, reference_logits(tiny_loaded, [*ids, 11, 12, 40]), atol=1e-4, rtol=1e-4)
    with pytest.raises(EngineError):
        core.truncate(slot, core.length(slot) + 1)


def test_one_pass_mixes_decode_rows_extensions_and_prompts_in_any_order(tiny_loaded: Any) -> None:
    core = make_core(tiny_loaded)
    sequences = [tokenize(tiny_loaded, p) for p in ("The quick brown fox", "Hi there", "A robot")]
    slots = [core.allocate() for _ in sequences[:2]]
    core.prefill(slots, sequences[:2])
    fresh = core.allocate()
    extension = [5, 6, 7]
    output = core.extend([fresh, slots[1], slots[0]], [sequences[2], extension, [9]], scored=[1, 3, 1])
    assert output.logits.shape[0] == 5
    torch.testing.assert_close(output.logits[0], reference_logits(tiny_loaded, sequences[2]), atol=1e-4, rtol=1e-4)
    expected = every_position_reference(tiny_loaded, sequences[1] + extension)[-3:]
    torch.testing.assert_close(output.logits[1:4], expected, atol=1e-4, rtol=1e-4)
    decoded = reference_logits(tiny_loaded, [*sequences[0], 9])
    torch.testing.assert_close(output.logits[4], decoded, atol=1e-4, rtol=1e-4)


def test_extend_refuses_inputs_it_cannot_place(tiny_loaded: Any) -> None:
    core = make_core(tiny_loaded, capacity=16)
    slot = core.allocate()
    with pytest.raises(EngineError):
        core.extend([slot], [[]])
    with pytest.raises(EngineError):
        core.extend([slot], [[1, 2]], scored=[3])
    with pytest.raises(EngineError):
        core.extend([slot], [list(range(17))])
    assert core.length(slot) == 0


@pytest.fixture(scope="module")
def kernels(tmp_path_factory: pytest.TempPathFactory) -> FusedKernels:
    return build_kernels(tmp_path_factory.mktemp("fused"))


def tiny_llama_core(kernels: FusedKernels | None) -> DecodeCore:
    return tiny_core(tiny_llama_model(), torch.bfloat16, kernels)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "pytorch"])
def test_bf16_verification_equals_decoding_the_same_tokens_one_by_one(kernels: FusedKernels, fused: bool) -> None:
    """What greedy text identical with speculation on and off rests on: the logits a verification step gives
    at each position are exactly those single-token decode steps give (bf16, the fused step or PyTorch's)."""
    prompt, fed = [5, 17, 23, 9, 41, 3], [8, 30, 2, 77, 15]
    one_by_one = tiny_llama_core(kernels if fused else None)
    slot = one_by_one.allocate()
    one_by_one.prefill([slot], [prompt])
    expected = torch.stack([one_by_one.decode([slot], torch.tensor([t]))[0] for t in fed])
    verifying = tiny_llama_core(kernels if fused else None)
    slot = verifying.allocate()
    verifying.prefill([slot], [prompt])
    got = verifying.extend([slot], [fed], scored=[len(fed)]).logits
    if fused:
        assert torch.equal(got, expected)
    else:  # PyTorch's attention kernels differ between one query and several: bf16 rounding apart
        torch.testing.assert_close(got, expected, atol=0.05, rtol=0.02)
