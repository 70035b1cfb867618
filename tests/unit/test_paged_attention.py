"""Attention through block tables equals attention over one contiguous row per sequence: fused.c's kernel
(bit-exact: the same sums in the same order) and the PyTorch path (float32 and bfloat16 exact), on a tiny
Llama whose sequences' blocks are scattered through the pool."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaForCausalLM

from tests.support.tiny_core import build_kernels, tiny_core, tiny_llama_model
from tests.unit import fused_reference as reference
from textgen.engine.core.blocks import OutOfBlocksError
from textgen.engine.core.decoder import DecodeCore, architecture_for
from textgen.engine.core.fused import FusedKernels
from textgen.engine.core.weights import LinearFactory, WeightPlan

PROMPTS = [[5, 17, 23, 9, 41, 3], [7, 7, 60], [11, 2, 90, 33, 8, 21, 64, 70, 12, 19, 1, 4, 4, 8]]
CAPACITY = 64


@pytest.fixture(scope="module")
def kernels(tmp_path_factory: pytest.TempPathFactory) -> FusedKernels:
    return build_kernels(tmp_path_factory.mktemp("fused"))


@pytest.fixture(scope="module")
def tiny_llama() -> LlamaForCausalLM:
    return tiny_llama_model()


def core_of(
    model: LlamaForCausalLM, dtype: torch.dtype, block_size: int, fused: FusedKernels | None = None
) -> DecodeCore:
    return tiny_core(model, dtype, fused, capacity=CAPACITY, block_size=block_size)


def run(core: DecodeCore, steps: int = 20) -> list[torch.Tensor]:
    """Prefill, free the middle sequence, admit another (it takes the freed blocks), then decode: with
    small blocks every sequence's table ends up scattered through the pool."""
    slots = [core.allocate() for _ in PROMPTS]
    out = [core.prefill(slots, PROMPTS)]
    tokens = out[0].argmax(-1)
    core.free([slots[1]])
    late = core.allocate()
    live = [slots[0], slots[2]]
    mixed = core.step(live, tokens[[0, 2]], [late], [[3, 1, 4, 1, 5, 9, 2, 6]])
    out.append(mixed)
    live, tokens = [*live, late], mixed.argmax(-1)
    for _ in range(steps):
        logits = core.decode(live, tokens)
        out.append(logits)
        tokens = logits.argmax(-1)
    core.free(live)
    return out


def scattered(core: DecodeCore) -> bool:
    tables = [core.cache.table(slot).blocks for slot in core.cache.slots_in_row_order()]
    return any(blocks != list(range(blocks[0], blocks[0] + len(blocks))) for blocks in tables if blocks)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pytorch_path_through_tables_equals_one_block_per_sequence(
    tiny_llama: LlamaForCausalLM, dtype: torch.dtype
) -> None:
    contiguous = run(core_of(tiny_llama, dtype, block_size=CAPACITY))
    paged_core = core_of(tiny_llama, dtype, block_size=4)
    paged = run(paged_core)
    for want, got in zip(contiguous, paged, strict=True):
        assert torch.equal(want, got)


def test_fused_step_through_tables_equals_one_block_per_sequence(
    tiny_llama: LlamaForCausalLM, kernels: FusedKernels
) -> None:
    contiguous = run(core_of(tiny_llama, torch.bfloat16, block_size=CAPACITY, fused=kernels))
    paged = run(core_of(tiny_llama, torch.bfloat16, block_size=4, fused=kernels))
    for want, got in zip(contiguous, paged, strict=True):
        assert torch.equal(want, got)


def test_blocks_really_are_scattered_in_these_runs(tiny_llama: LlamaForCausalLM) -> None:
    core = core_of(tiny_llama, torch.float32, block_size=4)
    slots = [core.allocate() for _ in PROMPTS]
    tokens = core.prefill(slots, PROMPTS).argmax(-1)
    for _ in range(3):  # the first sequence's third block comes after everyone's prompt blocks
        tokens = core.decode(slots, tokens).argmax(-1)
    assert scattered(core)


@pytest.mark.parametrize("block_size", [16, 8, 3])
def test_fused_kernel_reads_a_shuffled_pool_exactly_as_the_contiguous_cache(
    kernels: FusedKernels, block_size: int
) -> None:
    """The kernel alone: the reference case's [S, H, T, D] cache cut into blocks and shuffled."""
    reference.check_paged_attention(kernels, 4, 2, block_size)


def test_fused_kernel_refuses_a_block_id_outside_the_pool(kernels: FusedKernels) -> None:
    case = reference.attention_case(4, 2)
    tables = torch.arange(3)[:, None].clone()
    tables[1, 0] = 3  # the pool has blocks 0..2
    out = torch.empty(case.qkv.shape[0], case.heads * case.dim, dtype=torch.bfloat16)
    keys = case.keys.clone()
    with pytest.raises(Exception, match="outside its tensor"):
        kernels.rotary_cache_attention(
            case.qkv, case.cos, case.sin, case.positions, case.cache_rows, keys, case.values.clone(), out,
            case.heads, case.scale, tables,
        )
    assert torch.equal(keys, case.keys)


def test_a_prompt_continuing_its_cached_positions_matches_one_whole_prefill(tiny_llama: LlamaForCausalLM) -> None:
    """Prefill at an offset (what a cached prefix needs): the second half attends to the first half's blocks."""
    prompt = PROMPTS[2]
    core = core_of(tiny_llama, torch.float32, block_size=4)
    whole = core.prefill([core.allocate()], [prompt])
    slot = core.allocate()
    core.prefill([slot], [prompt[:9]])
    rest = core.prefill([slot], [prompt[9:]])
    torch.testing.assert_close(rest, whole, atol=1e-5, rtol=1e-5)


def test_a_full_pool_refuses_growth_without_computing(tiny_llama: LlamaForCausalLM) -> None:
    arch, _ = architecture_for(tiny_llama)
    assert arch is not None
    factory = LinearFactory(WeightPlan.single("float32"), torch.float32, torch.device("cpu"))
    core = core_of(tiny_llama, torch.float32, block_size=4)
    block_bytes = core.cache.block_bytes
    small = DecodeCore(
        copy.deepcopy(tiny_llama), arch, WeightPlan.single("float32"), factory, slots=4, capacity=CAPACITY,
        block_size=4, kv_memory=block_bytes * 17,  # one full-context sequence (16 blocks) and one more block
    )
    assert small.cache.pool.total == 17
    first, second = small.allocate(), small.allocate()
    small.prefill([first], [[1] * 60])  # 15 blocks
    small.prefill([second], [[2] * 8])  # 2 blocks: the pool is full
    with pytest.raises(OutOfBlocksError):
        small.decode([first, second], torch.tensor([1, 1]))  # the second needs a third block
    assert small.cache.lengths_of([first, second]) == [60, 8]
    small.free([second])
    small.decode([first], torch.tensor([1]))
    assert small.cache.pool.used == 16
