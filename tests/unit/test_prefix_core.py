"""Prefill that continues a sequence (on a cached prefix's shared blocks, after an earlier chunk): the same
logits as one whole prefill, in the PyTorch path (tiny GPT-2 and Llama, float32) and in fused.c's step
(tiny Llama, bf16)."""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import LlamaForCausalLM

from tests.support.tiny_core import build_kernels, tiny_core, tiny_llama_model
from textgen.engine.core.decoder import DecodeCore
from textgen.engine.core.fused import FusedKernels
from textgen.errors import EngineError

PROMPT = [5, 17, 23, 9, 41, 3, 7, 7, 60, 11, 2, 90, 33, 8, 21, 64, 70, 12, 19, 1, 4, 44, 45]
BLOCK = 4


@pytest.fixture(scope="module")
def tiny_llama() -> LlamaForCausalLM:
    return tiny_llama_model()


@pytest.fixture(scope="module")
def kernels(tmp_path_factory: pytest.TempPathFactory) -> FusedKernels:
    return build_kernels(tmp_path_factory.mktemp("fused"))


def core_of(model: torch.nn.Module, dtype: torch.dtype, fused: FusedKernels | None = None) -> DecodeCore:
    return tiny_core(model, dtype, fused, block_size=BLOCK)


def whole_then_decode(core: DecodeCore, prompt: list[int], steps: int = 4) -> list[torch.Tensor]:
    slot = core.allocate()
    logits = [core.prefill([slot], [prompt])[0]]
    for _ in range(steps):
        logits.append(core.decode([slot], logits[-1].argmax(-1, keepdim=True))[0])
    core.free([slot])
    return logits


def chunks_then_decode(core: DecodeCore, prompt: list[int], cuts: list[int], steps: int = 4) -> list[torch.Tensor]:
    """The prompt prefilled in pieces [0, cuts[0]), [cuts[0], cuts[1]), ...; a decoding neighbour shares
    every step, so the pieces run in mixed passes as the scheduler runs them."""
    neighbour = core.allocate()
    neighbour_token = core.prefill([neighbour], [[3, 1, 4, 1, 5]]).argmax(-1)
    slot = core.allocate()
    bounds = [0, *cuts, len(prompt)]
    for start, end in itertools.pairwise(bounds):
        out = core.step([neighbour], neighbour_token, [slot], [prompt[start:end]])
        neighbour_token = out[:1].argmax(-1)
    logits = [out[1]]
    for _ in range(steps):
        logits.append(core.decode([slot], logits[-1].argmax(-1, keepdim=True))[0])
    core.free([slot, neighbour])
    return logits


@pytest.mark.parametrize("cuts", [[8], [1], [4, 9, 16], [22]])
def test_prefill_in_pieces_equals_one_prefill_float32(tiny_llama: LlamaForCausalLM, cuts: list[int]) -> None:
    core = core_of(tiny_llama, torch.float32)
    expected = whole_then_decode(core, PROMPT)
    got = chunks_then_decode(core, PROMPT, cuts)
    for want, have in zip(expected, got, strict=True):
        torch.testing.assert_close(have, want, atol=2e-5, rtol=2e-5)


def test_prefill_in_pieces_on_gpt2(tiny_loaded: object) -> None:
    core = core_of(tiny_loaded.model, torch.float32)  # type: ignore[attr-defined]
    expected = whole_then_decode(core, PROMPT)
    got = chunks_then_decode(core, PROMPT, [5, 12])
    for want, have in zip(expected, got, strict=True):
        torch.testing.assert_close(have, want, atol=2e-5, rtol=2e-5)


def test_prefill_in_pieces_through_the_fused_step(tiny_llama: LlamaForCausalLM, kernels: FusedKernels) -> None:
    core = core_of(tiny_llama, torch.bfloat16, kernels)
    expected = whole_then_decode(core, PROMPT, steps=6)
    got = chunks_then_decode(core, PROMPT, [4, 13], steps=6)
    for want, have in zip(expected, got, strict=True):
        # Each token's arithmetic is the same; only the products' row blocking differs (bf16 rounding).
        torch.testing.assert_close(have, want, atol=0.03, rtol=0.02)
        assert int(have.argmax()) == int(want.argmax())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_cached_prefix_shared_equals_computing_it(tiny_llama: LlamaForCausalLM, dtype: torch.dtype) -> None:
    core = core_of(tiny_llama, dtype)
    assert core.prefix_block_size == BLOCK
    expected = whole_then_decode(core, PROMPT)
    keys = [("block", i) for i in range(5)]  # any hashable names (the prefix index makes the real ones)
    # A first sequence computes the prompt and names its first five blocks, then ends: they stay cached.
    first = core.allocate()
    core.prefill([first], [PROMPT])
    core.publish_prefix(first, keys)
    core.free([first])
    pool = core.cache.pool
    assert pool.cached_free == 5
    # A second sequence starts on them (shared, not copied) and computes only the rest.
    held = core.hold_prefix([*keys, ("block", 99)])
    assert len(held) == 5 and pool.cached_free == 0
    second = core.allocate()
    core.load_prefix(second, held)
    core.release_blocks(held)
    assert core.cache.length(second) == 20 and core.cache.table(second).blocks == held
    logits = [core.prefill([second], [PROMPT[20:]])[0]]
    for _ in range(4):
        logits.append(core.decode([second], logits[-1].argmax(-1, keepdim=True))[0])
    for want, have in zip(expected, logits, strict=True):
        torch.testing.assert_close(have, want, atol=2e-5 if dtype == torch.float32 else 0.03, rtol=2e-2)
        assert int(have.argmax()) == int(want.argmax())
    # A third sequence shares the same blocks while the second runs: both read them, neither writes them.
    third = core.allocate()
    core.load_prefix(third, core.hold_prefix(keys[:3]))
    assert all(pool.refcount(b) >= 2 for b in held[:3])
    core.free([second, third])
    pool.release_all(held[:3])  # the hold taken for the third
    pool.check_consistent()
    assert pool.cached_free == 5


def kv_of(core: DecodeCore, slot: int, positions: int) -> list[torch.Tensor]:
    """The slot's keys and values at positions [0, positions), layer by layer."""
    cache, found = core.cache, []
    for store in (*cache.keys, *cache.values):
        for position in range(positions):
            block, offset = cache.table(slot).locate(position)
            found.append(store[block, :, offset])
    return found


@pytest.mark.parametrize(
    ("weights", "fused", "same"), [("int4", True, True), (None, True, False), ("int4", False, False)]
)
def test_decode_kv_is_prefill_kv_where_the_step_and_format_give_rows_the_same_bits(
    kernels: FusedKernels, weights: str | None, fused: bool, same: bool
) -> None:
    """Where the core says so, a sequence's keys and values written by decode steps (and by verification steps
    of several tokens) are exactly those a prefill of the same tokens writes: a finished sequence's generated
    blocks may then be cached under the same names as prefilled ones."""
    model = tiny_llama_model(vocab_size=112)  # int4 packs output rows by 16
    core = tiny_core(model, torch.bfloat16, kernels if fused else None, weights=weights, block_size=BLOCK)
    assert core.decode_kv_is_prefill_kv is same
    if not same:
        return
    generated = [7, 33, 2, 91, 14, 14, 50, 8, 66, 3, 29]
    whole = core.allocate()
    core.prefill([whole], [PROMPT + generated])
    stepped = core.allocate()
    core.prefill([stepped], [PROMPT])
    for token in generated[:3]:  # one token a step...
        core.decode([stepped], torch.tensor([token]))
    for start, end in ((3, 4), (4, 8), (8, 11)):  # ...then verification-sized pieces, one at a time
        core.extend([stepped], [generated[start:end]])
    positions = len(PROMPT) + len(generated)
    expected, got = kv_of(core, whole, positions), kv_of(core, stepped, positions)
    assert all(torch.equal(want, have) for want, have in zip(expected, got, strict=True))


def test_load_prefix_checks_its_slot(tiny_llama: LlamaForCausalLM) -> None:
    core = core_of(tiny_llama, torch.float32)
    slot = core.allocate()
    core.prefill([slot], [PROMPT[:6]])
    core.publish_prefix(slot, [("k", 0), ("k", 1), ("k", 2)])  # only one block is full: one name given
    assert core.cache.pool.cached(("k", 0)) is not None and core.cache.pool.cached(("k", 1)) is None
    with pytest.raises(EngineError, match="not empty"):
        core.load_prefix(slot, core.hold_prefix([("k", 0)]))
