"""The decode core against the transformers reference on the tiny GPT-2, the slot cache, the int4
kernel on Q4_1 blocks, the w8a8 kernel, and the scheduler running on either core."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch

from textgen.engine.core import CoreOptions, build_core
from textgen.engine.core.activations import OUTLIER_CHANNELS, outlier_channels
from textgen.engine.core.decoder import DecodeCore, architecture_for
from textgen.engine.core.gguf_blocks import Int4Blocks
from textgen.engine.core.hf import TransformersCore
from textgen.engine.core.linear import Int4Kernel, W8A8Kernel, q4_1_to_int4
from textgen.engine.core.weights import LinearFactory, WeightPlan
from textgen.engine.scheduler import BatchedEngine
from textgen.engine.types import EngineLimits, GenerationRequest, SamplingParams
from textgen.errors import ConfigError, EngineError

PROMPTS = ["The quick brown fox", "Once upon a time there was a robot who learned to paint", "Hi"]


def make_core(loaded: Any, fmt: str = "float32", slots: int = 8, capacity: int = 128) -> DecodeCore:
    arch, reason = architecture_for(loaded.model)
    assert arch is not None, reason
    plan = WeightPlan.single(fmt)
    factory = LinearFactory(
        plan, getattr(torch, fmt) if fmt in ("float32", "bfloat16") else torch.bfloat16, torch.device("cpu")
    )
    return DecodeCore(loaded.model, arch, plan, factory, slots=slots, capacity=capacity)


def reference_logits(loaded: Any, ids: list[int]) -> torch.Tensor:
    """transformers' own forward over the whole sequence: next-token logits [V] float32."""
    with torch.inference_mode():
        return loaded.model(torch.tensor([ids])).logits[0, -1].float()


def tokenize(loaded: Any, text: str) -> list[int]:
    return list(loaded.tokenizer(text).input_ids)


def test_prefill_and_decode_match_transformers_with_mixed_lengths(tiny_loaded: Any) -> None:
    """Three prompts of different lengths share every step; each row's logits equal the reference's
    for its own sequence, so masking, positions and the cache are right for every live length."""
    core = make_core(tiny_loaded)
    sequences = [tokenize(tiny_loaded, p) for p in PROMPTS]
    assert len({len(s) for s in sequences}) == 3
    slots = [core.allocate() for _ in sequences]
    logits = core.prefill(slots, sequences)
    for step in range(12):
        for row, ids in enumerate(sequences):
            torch.testing.assert_close(logits[row], reference_logits(tiny_loaded, ids), atol=1e-4, rtol=1e-4)
        chosen = logits.argmax(-1)
        for row, ids in enumerate(sequences):
            ids.append(int(chosen[row]))
        order = core.slots_in_order()
        assert order == slots
        logits = core.decode(order, chosen)
        assert step >= 0


def test_bf16_core_stays_within_bf16_rounding_of_the_float32_reference(tiny_loaded: Any) -> None:
    """bf16 keeps ~3 significant digits: logits agree with float32 within 0.05 (relative 2%) here."""
    core = make_core(tiny_loaded, "bfloat16")
    ids = tokenize(tiny_loaded, PROMPTS[1])
    logits = core.prefill([core.allocate()], [ids])[0]
    torch.testing.assert_close(logits, reference_logits(tiny_loaded, ids), atol=0.05, rtol=0.02)


def test_decode_in_any_slot_order_returns_rows_in_that_order(tiny_loaded: Any) -> None:
    core = make_core(tiny_loaded)
    sequences = [tokenize(tiny_loaded, p) for p in PROMPTS]
    slots = [core.allocate() for _ in sequences]
    first = core.prefill(slots, sequences).argmax(-1)
    reversed_slots = slots[::-1]
    logits = core.decode(reversed_slots, first.flip(0))
    for row, slot in enumerate(reversed_slots):
        index = slots.index(slot)
        expected = reference_logits(tiny_loaded, [*sequences[index], int(first[index])])
        torch.testing.assert_close(logits[row], expected, atol=1e-4, rtol=1e-4)


def test_freeing_a_slot_keeps_the_others_intact_and_it_is_reused(tiny_loaded: Any) -> None:
    core = make_core(tiny_loaded, slots=3)
    sequences = [tokenize(tiny_loaded, p) for p in PROMPTS]
    slots = [core.allocate() for _ in sequences]
    chosen = core.prefill(slots, sequences).argmax(-1)
    for row, ids in enumerate(sequences):
        ids.append(int(chosen[row]))
    core.free([slots[0]])  # the last row moves into row 0
    assert core.free_slots == 1
    survivors = core.slots_in_order()
    assert sorted(survivors) == sorted(slots[1:])
    tokens = torch.tensor([sequences[slots.index(s)][-1] for s in survivors])
    logits = core.decode(survivors, tokens)
    for row, slot in enumerate(survivors):
        torch.testing.assert_close(
            logits[row], reference_logits(tiny_loaded, sequences[slots.index(slot)]), atol=1e-4, rtol=1e-4
        )
    reused = core.allocate()
    assert reused == slots[0]
    fresh = tokenize(tiny_loaded, "Numbers 0 1 2")
    torch.testing.assert_close(
        core.prefill([reused], [fresh])[0], reference_logits(tiny_loaded, fresh), atol=1e-4, rtol=1e-4
    )


def test_a_full_cache_refuses_another_sequence_and_a_slot_cannot_outgrow_it(tiny_loaded: Any) -> None:
    core = make_core(tiny_loaded, slots=2, capacity=8)
    first, second = core.allocate(), core.allocate()
    with pytest.raises(EngineError, match="no free slot"):
        core.allocate()
    core.prefill([first, second], [[1, 2, 3, 4, 5, 6, 7], [1]])
    core.decode([first, second], torch.tensor([1, 1]))  # first now holds 8 positions: full
    with pytest.raises(EngineError, match="capacity"):
        core.decode([first, second], torch.tensor([1, 1]))
    with pytest.raises(EngineError, match="capacity"):
        core.prefill([core.allocate() if core.free_slots else second], [[1] * 9])


def test_cache_memory_is_reserved_once_and_touched_as_sequences_grow(tiny_loaded: Any) -> None:
    core = make_core(tiny_loaded, slots=4, capacity=1024)
    reserved = core.cache.reserved_bytes
    assert core.describe()["kv_cache_bytes"] == reserved
    assert core.cache.touched_bytes == 0
    slot = core.allocate()
    core.prefill([slot], [tokenize(tiny_loaded, PROMPTS[0])])
    assert 0 < core.cache.touched_bytes < reserved / 8


def test_score_gives_every_position_like_the_reference(tiny_loaded: Any) -> None:
    core = make_core(tiny_loaded)
    ids = tokenize(tiny_loaded, PROMPTS[1])
    with torch.inference_mode():
        expected = tiny_loaded.model(torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(core.score(ids), expected, atol=1e-4, rtol=1e-4)
    assert core.free_slots == 8


# ----- int4 on Q4_1 blocks ---------------------------------------------------------------------------


def random_q4_1_bytes(rows: int, cols: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A GGUF Q4_1 tensor's bytes and the weights they encode (d * q + m, float32)."""
    gen = torch.Generator().manual_seed(seed)
    groups = cols // 32
    d = (torch.rand(rows, groups, generator=gen) * 0.02 + 0.001).half()
    m = (-(torch.rand(rows, groups, generator=gen) * 0.2)).half()
    q = torch.randint(0, 16, (rows, groups, 32), generator=gen)
    packed = (q[..., :16] | (q[..., 16:] << 4)).to(torch.uint8)  # low nibbles first half, high second
    raw = torch.cat([d[..., None].view(torch.uint8), m[..., None].view(torch.uint8), packed], dim=-1)
    weights = (d.float()[..., None] * q + m.float()[..., None]).reshape(rows, cols)
    return raw.reshape(rows, groups * 20), weights


def test_q4_1_bytes_decode_to_the_blocks_exactly() -> None:
    raw, weights = random_q4_1_bytes(64, 128)
    q, scale, zero = q4_1_to_int4(raw, 64, 128)
    torch.testing.assert_close(Int4Blocks(q, scale, zero).dequantize(), weights, atol=1e-6, rtol=0)


def test_int4_kernel_reproduces_the_blocks_within_the_bf16_rounding_of_scale_and_zero() -> None:
    """The kernel computes (q - 8) * bf16(d) + bf16(m + 8d) and rounds the result to bf16. bf16 keeps 8
    significant bits, so rounding moves a value by at most 2^-8 of itself: a weight moves by at most
    (8 |d| + |m + 8d|) * 2^-8 from the scale and zero, plus |w| * 2^-8 from the output."""
    rows, cols = 48, 96
    raw, weights = random_q4_1_bytes(rows, cols, seed=3)
    q, scale, zero = q4_1_to_int4(raw, rows, cols)
    kernel = Int4Kernel.from_blocks(q, scale, zero, None)
    effective = kernel(torch.eye(cols, dtype=torch.bfloat16)).float().t()  # [rows, cols]
    per_group = (8 * scale.abs() + zero.abs()) * 2**-8  # [rows, groups]
    bound = per_group.repeat_interleave(32, dim=1) + weights.abs() * 2**-8
    assert bool(((effective - weights).abs() <= bound + 1e-7).all())
    bf16_copy_error = (weights.bfloat16().float() - weights).abs().mean()
    assert (effective - weights).abs().mean() <= 4 * bf16_copy_error


# ----- choosing and running a core -------------------------------------------------------------------


def test_build_core_picks_the_own_core_for_gpt2_and_honours_transformers(tiny_loaded: Any) -> None:
    own = build_core(tiny_loaded, CoreOptions(slots=4, positions=64))
    assert own.name == "textgen-gpt2"
    forced = build_core(tiny_loaded, CoreOptions(core="transformers", slots=4, positions=64))
    assert isinstance(forced, TransformersCore)
    with pytest.raises(ConfigError, match="TEXTGEN_WEIGHTS=int4"):
        build_core(tiny_loaded, CoreOptions(core="transformers", weights="int4"))


@pytest.mark.parametrize("weights", ["int8", "w8a8", "int4"])
def test_quantized_formats_run_the_tiny_model(tiny_loaded: Any, weights: str) -> None:
    core = build_core(tiny_loaded, CoreOptions(weights=weights, slots=2, positions=64))
    assert core.describe()["weights"] == weights
    ids = tokenize(tiny_loaded, PROMPTS[0])
    logits = core.prefill([core.allocate()], [ids])[0]
    reference = reference_logits(tiny_loaded, ids)
    assert torch.isfinite(logits).all()
    assert torch.nn.functional.cosine_similarity(logits, reference, dim=0) > 0.9


@pytest.mark.parametrize("core", ["textgen", "transformers"])
async def test_the_scheduler_gives_the_same_greedy_text_on_either_core(tiny_loaded: Any, core: str) -> None:
    limits = EngineLimits(max_running=8)
    params = SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)
    results = {}
    for name in ("textgen", core):
        engine = BatchedEngine(
            tiny_loaded,
            limits,
            core_options=CoreOptions(core=name, weights="float", slots=8, positions=256),
            warmup=False,
        )
        await engine.start()
        try:
            handles = [engine.submit(GenerationRequest(p, params)) for p in PROMPTS]
            results[name] = [r.text for r in await asyncio.gather(*(h.result() for h in handles))]
        finally:
            await engine.stop(0)
    assert results[core] == results["textgen"]
    assert all(results["textgen"])


def test_one_step_decodes_running_rows_and_prefills_new_prompts_together(tiny_loaded: Any) -> None:
    core = make_core(tiny_loaded)
    running = [tokenize(tiny_loaded, p) for p in PROMPTS[:2]]
    slots = [core.allocate() for _ in running]
    chosen = core.prefill(slots, running).argmax(-1)
    for row, ids in enumerate(running):
        ids.append(int(chosen[row]))
    newcomer = tokenize(tiny_loaded, PROMPTS[2])
    new_slot = core.allocate()
    logits = core.step(slots, chosen, [new_slot], [newcomer])  # [3, V]: two decode rows, then the prompt
    assert logits.shape[0] == 3
    for row, ids in enumerate([*running, newcomer]):
        torch.testing.assert_close(logits[row], reference_logits(tiny_loaded, ids), atol=1e-4, rtol=1e-4)
    assert core.slots_in_order() == [*slots, new_slot]


# ----- w8a8: int8 weights x int8 activations, outlier channels in float --------------------------------


def _w8a8_case(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A weight [96, 128] and inputs [5, 128] whose channels 7 and 90 are ~100x wider than the rest (as a
    transformer's residual stream has), with the outliers as the channels' measured ranges say."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(96, 128, generator=gen) * 0.05
    x = torch.randn(5, 128, generator=gen)
    x[:, [7, 90]] *= 100.0
    outliers = outlier_channels({"layer": x.abs().amax(dim=0)}, "layer", 128)
    return weight, x, outliers


def test_w8a8_keeps_the_widest_channels_in_float_and_stays_close_to_float32() -> None:
    weight, x, outliers = _w8a8_case()
    assert {7, 90} <= set(outliers.tolist()) and len(outliers) == min(OUTLIER_CHANNELS, 128)
    exact = x @ weight.t()
    kernel = W8A8Kernel.quantize(weight, None, outliers)
    # Each product term carries at most half a step of the row's and of the weight channel's int8 grid.
    error = (kernel(x) - exact).abs().max()
    assert error < 0.01 * exact.abs().max()
    # Without the float outliers the two wide channels set every row's int8 step: 10x worse or more.
    naive = W8A8Kernel.quantize(weight, None, torch.tensor([0]))  # channel 0 is an ordinary one
    assert (naive(x) - exact).abs().max() > 10 * error


def test_w8a8_rows_depend_on_their_batch_only_through_float_rounding() -> None:
    """Each row is quantized on its own and integer products are exact; only the float outlier product
    may round differently with another batch shape."""
    weight, x, outliers = _w8a8_case(seed=1)
    kernel = W8A8Kernel.quantize(weight, torch.randn(96), outliers)
    together = kernel(x)
    for row in range(x.shape[0]):
        torch.testing.assert_close(kernel(x[row : row + 1])[0], together[row], rtol=1e-6, atol=1e-5)
    alone = kernel(x[:1] * 1000)  # a much wider row beside the others changes nothing for them
    torch.testing.assert_close(kernel(torch.cat([x[:1] * 1000, x[1:]]))[1:], together[1:], rtol=1e-6, atol=1e-5)
    assert torch.isfinite(alone).all()


def test_w8a8_layers_of_gpt2_find_their_measured_ranges(tiny_loaded: Any) -> None:
    core = build_core(tiny_loaded, CoreOptions(weights="w8a8", slots=1, positions=32))
    kernel = core.weights.layers[0].qkv.kernel_for(1)
    assert isinstance(kernel, W8A8Kernel)
    with pytest.raises(KeyError, match="no activation range"):
        outlier_channels({}, "h.0.attn.c_attn", 32)


def test_auto_plan_takes_the_fastest_format_at_each_end_and_the_crossover_between() -> None:
    from textgen.engine.core.calibrate import plan_from_timings

    timings = {
        "int4": {1: 8.0, 8: 18.0, 16: 33.0, 32: 62.0, 64: 124.0},
        "w8a8": {1: 19.0, 8: 27.0, 16: 35.0, 32: 53.0, 64: 80.0},
        "float32": {1: 27.0, 8: 35.0, 16: 42.0, 32: 58.0, 64: 94.0},
    }
    plan = plan_from_timings(timings)
    assert plan.describe() == "int4 for batches 1-16, w8a8 for batches >= 17"
    assert plan_from_timings({"w8a8": timings["w8a8"], "float32": timings["float32"]}).formats == ["w8a8"]


async def test_an_engine_that_owns_its_model_frees_the_duplicate_weights(tiny_model_dir: Any) -> None:
    from textgen.config import load_settings
    from textgen.loader import load_model

    loaded = load_model(load_settings(model=str(tiny_model_dir), dtype="float32"))  # not the shared fixture
    before = sum(p.numel() for p in loaded.model.parameters())
    engine = BatchedEngine(loaded, EngineLimits(max_running=4), warmup=False, owns_model=True)
    await engine.start()
    try:
        after = sum(p.numel() for p in loaded.model.parameters())
        assert after < before / 2 and loaded.weights_released
        greedy = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)
        result = await engine.submit(GenerationRequest("The quick brown fox", greedy)).result()
        assert result.completion_tokens == 6
        with pytest.raises(EngineError, match="load the model again"):
            build_core(loaded, CoreOptions(slots=1, positions=16))
    finally:
        await engine.stop(0)
