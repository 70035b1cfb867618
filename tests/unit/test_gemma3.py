"""Gemma 3 and Mistral's sliding window in the own core, on tiny random configs against transformers in float32.

Windows are 5 positions and prompts up to 14 tokens, with decoding past 24 positions, so local layers attend
to a window that has slid while global ones see everything. Tolerances: float32 logits within 1e-4 of
transformers'; bf16 (PyTorch path or fused.c) within 0.05 absolute of the float32 reference at every step,
with the same tokens fed to both (bf16 rounding alone moves these logits by ~0.02).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import textgen.engine.core.gemma3 as gemma3
from tests.support.tiny_core import build_kernels
from tests.support.tiny_sliding import (
    WINDOW,
    decode_with_joiners,
    greedy_alone,
    prompts_of_lengths,
    tiny_gemma3,
    tiny_mistral,
)
from textgen.engine.core.activations import input_ranges
from textgen.engine.core.decoder import DecodeCore, architecture_for
from textgen.engine.core.fused import FusedArgumentError, FusedKernels
from textgen.engine.core.weights import LinearFactory, WeightPlan

LENGTHS = (3, 9, 14)
Builder = Callable[..., Any]
MODELS = pytest.mark.parametrize("build", [tiny_gemma3, tiny_mistral], ids=["gemma3", "mistral"])


@pytest.fixture(scope="module")
def kernels(tmp_path_factory: pytest.TempPathFactory) -> FusedKernels:
    return build_kernels(tmp_path_factory.mktemp("fused"))


def core_of(model: Any, dtype: torch.dtype, fused: FusedKernels | None = None, slots: int = 8) -> DecodeCore:
    arch, reason = architecture_for(model)
    assert arch is not None, reason
    plan = WeightPlan.single(str(dtype).removeprefix("torch."))
    factory = LinearFactory(plan, dtype, torch.device("cpu"), fused=fused)
    return DecodeCore(model, arch, plan, factory, slots=slots, capacity=64, fused=fused)


@torch.inference_mode()
def reference_logits(model: Any, ids: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([ids])).logits[0, -1].float()


def forced_logits(core: DecodeCore, steps: int = 12, seed: int = 0) -> list[torch.Tensor]:
    """Prefill LENGTHS' prompts, then decode the same random tokens whatever the core predicts."""
    generator = torch.Generator().manual_seed(seed)
    prompts = prompts_of_lengths(*LENGTHS)
    slots = [core.allocate() for _ in prompts]
    out = [core.prefill(slots, prompts)]
    for _ in range(steps):
        out.append(core.decode(slots, torch.randint(3, 150, (len(prompts),), generator=generator)))
    return out


@MODELS
def test_the_own_core_takes_sliding_window_models(build: Builder) -> None:
    arch, reason = architecture_for(build())
    assert arch is not None, reason
    assert arch.name == ("gemma3" if build is tiny_gemma3 else "llama")


@MODELS
def test_float32_logits_match_transformers_past_the_window(build: Builder) -> None:
    model = build()
    core = core_of(model, torch.float32)
    sequences = prompts_of_lengths(*LENGTHS)
    slots = [core.allocate() for _ in sequences]
    logits = core.prefill(slots, sequences)
    for _ in range(12):
        for row, ids in enumerate(sequences):
            torch.testing.assert_close(logits[row], reference_logits(model, ids), atol=1e-4, rtol=1e-4)
        chosen = logits.argmax(-1)
        for row, ids in enumerate(sequences):
            ids.append(int(chosen[row]))
        logits = core.decode(slots, chosen)
    assert min(len(s) for s in sequences) > 2 * WINDOW


def test_the_window_matters_here() -> None:
    """The same weights with a window wider than every sequence give other logits: the tests above would
    notice a window applied wrongly (or not at all)."""
    narrow, wide = tiny_gemma3(), tiny_gemma3(window=64)
    ids = prompts_of_lengths(14)[0]
    assert (reference_logits(narrow, ids) - reference_logits(wide, ids)).abs().max() > 0.05


@MODELS
def test_eight_sequences_of_different_lengths_joining_mid_flight_decode_as_alone(build: Builder) -> None:
    model = build()
    core = core_of(model, torch.float32)
    prompts = prompts_of_lengths(3, 9, 5, 14, 2, 7, 11, 1)
    order, generated = decode_with_joiners(core, prompts, steps=9)  # step 2 decodes four and prefills four
    for index, slot in enumerate(order):
        assert generated[slot] == greedy_alone(model, prompts[index], len(generated[slot])), f"prompt {index}"


def test_score_gives_every_position_like_transformers() -> None:
    model = tiny_gemma3()
    ids = prompts_of_lengths(14)[0]
    with torch.inference_mode():
        want = model(input_ids=torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(core_of(model, torch.float32).score(ids), want, atol=1e-4, rtol=1e-4)


@MODELS
def test_bf16_fused_and_pytorch_steps_stay_within_bf16_rounding_of_float32(
    build: Builder, kernels: FusedKernels
) -> None:
    model = build()
    fused_core = core_of(model, torch.bfloat16, kernels)
    assert fused_core._fused_applies(len(LENGTHS), 30)
    reference = forced_logits(core_of(model, torch.float32))
    eager = forced_logits(core_of(model, torch.bfloat16))
    fused = forced_logits(fused_core)
    for step, (want, a, b) in enumerate(zip(reference, eager, fused, strict=True)):
        torch.testing.assert_close(a, want, atol=0.05, rtol=0, msg=f"PyTorch bf16, step {step}")
        torch.testing.assert_close(b, want, atol=0.05, rtol=0, msg=f"fused, step {step}")


def test_a_gemma_model_with_logit_softcapping_falls_back_to_transformers() -> None:
    model = tiny_gemma3()
    model.config.final_logit_softcapping = 30.0
    assert architecture_for(model)[0] is None
    assert gemma3.unsupported_reason(model) == "final_logit_softcapping (30.0)"


def _reference_window_attention(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: list[int], keys: torch.Tensor,
    values: torch.Tensor, heads: int, scale: float, window: int, q_norm: torch.Tensor, k_norm: torch.Tensor,
) -> torch.Tensor:
    """One cache row: normalise and rotate every token's query and key, write keys/values, attend to the
    last ``window`` positions (float32 math over bf16 inputs)."""
    kv_heads, dim = keys.shape[1], keys.shape[3]
    n = qkv.shape[0]
    q = qkv[:, : heads * dim].view(n, heads, dim).float()
    k = qkv[:, heads * dim : (heads + kv_heads) * dim].view(n, kv_heads, dim).float()
    v = qkv[:, (heads + kv_heads) * dim :].view(n, kv_heads, dim)

    def prepare(x: torch.Tensor, weight: torch.Tensor, pos: int) -> torch.Tensor:
        normed = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight.float()).bfloat16().float()
        half = dim // 2
        rotated = torch.cat([-normed[..., half:], normed[..., :half]], dim=-1)
        return normed * cos[pos].float() + rotated * sin[pos].float()

    for r, pos in enumerate(positions):
        keys[0, :, pos] = prepare(k[r], k_norm, pos).bfloat16()
        values[0, :, pos] = v[r]
    out = torch.empty(n, heads * dim)
    group = heads // kv_heads
    for r, pos in enumerate(positions):
        first = max(0, pos + 1 - window)
        for h in range(heads):
            query = prepare(q[r, h], q_norm, pos).bfloat16().float()
            cached = keys[0, h // group, first : pos + 1].float()
            probs = ((cached @ query) * scale).softmax(-1)
            out[r, h * dim : (h + 1) * dim] = probs @ values[0, h // group, first : pos + 1].float()
    return out


@pytest.mark.parametrize("dim", [64, 256])
def test_fused_attention_normalises_heads_and_slides_its_window(kernels: FusedKernels, dim: int) -> None:
    generator = torch.Generator().manual_seed(1)
    heads, kv_heads, window, length = 4, 1, 7, 40  # past 16 positions: the vector path's blocks and tail
    qkv = torch.randn(length, (heads + 2 * kv_heads) * dim, generator=generator).bfloat16()
    angle = torch.arange(64)[:, None] * (1.0 / 10000 ** (torch.arange(dim // 2) * 2 / dim))[None, :]
    cos, sin = torch.cat([angle, angle], 1).cos().bfloat16(), torch.cat([angle, angle], 1).sin().bfloat16()
    q_norm = (1 + torch.rand(dim, generator=generator)).bfloat16()
    k_norm = torch.rand(dim, generator=generator).bfloat16()
    keys = torch.zeros(1, kv_heads, 48, dim, dtype=torch.bfloat16)
    values = torch.zeros_like(keys)
    want_keys, want_values = keys.clone(), values.clone()
    out = torch.empty(length, heads * dim, dtype=torch.bfloat16)
    kernels.rotary_cache_attention(
        qkv, cos, sin, torch.arange(length), torch.zeros(length, dtype=torch.long), keys, values, out, heads, 0.1,
        window=window, q_norm=q_norm, k_norm=k_norm, norm_eps=1e-6,
    )
    want = _reference_window_attention(
        qkv, cos, sin, list(range(length)), want_keys, want_values, heads, 0.1, window, q_norm, k_norm
    )
    torch.testing.assert_close(keys.float(), want_keys.float(), atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=2e-2)


def test_fused_attention_refuses_a_negative_window_and_a_misshapen_norm(kernels: FusedKernels) -> None:
    qkv = torch.zeros(1, 3 * 64, dtype=torch.bfloat16)
    table = torch.zeros(8, 64, dtype=torch.bfloat16)
    keys = torch.zeros(1, 1, 8, 64, dtype=torch.bfloat16)
    args = (qkv, table, table, torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long), keys,
            keys.clone(), torch.empty(1, 64, dtype=torch.bfloat16), 1, 0.125)
    with pytest.raises(FusedArgumentError, match="window"):
        kernels.rotary_cache_attention(*args, window=-1)
    with pytest.raises(FusedArgumentError, match="q_norm"):
        kernels.rotary_cache_attention(*args, q_norm=torch.ones(32, dtype=torch.bfloat16))


def test_gelu_tanh_mul_matches_pytorch_in_bf16(kernels: FusedKernels) -> None:
    """Including gates far out on both sides (-200..200), where the exponential would overflow."""
    gate_up = (torch.randn(16, 2 * 96, generator=torch.Generator().manual_seed(2)) * 3).bfloat16()
    gate_up[0, :96] = torch.linspace(-200, 200, 96)
    out = torch.empty(16, 96, dtype=torch.bfloat16)
    kernels.gelu_tanh_mul(gate_up, out)
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(out, F.gelu(gate, approximate="tanh") * up, atol=1e-2, rtol=1e-2)


class _RandomTokens:
    """Stands in for a tokenizer when measuring activation ranges: any text -> 64 fixed random ids."""

    def __call__(self, _text: str, return_tensors: str = "pt") -> Any:
        ids = torch.randint(3, 150, (1, 64), generator=torch.Generator().manual_seed(3))
        return type("Encoded", (), {"input_ids": ids})()


@pytest.mark.parametrize("fmt", ["int8", "w8a8", "int4"])
def test_quantized_formats_run_the_fused_gemma_step(kernels: FusedKernels, fmt: str) -> None:
    """The fused step with each quantized format gives the PyTorch path's logits (same format) up to bf16
    rounding; both stay near float32 (4 bits on these tiny random weights cost the most: cosine ~0.90)."""
    model = tiny_gemma3()
    ids = prompts_of_lengths(14)[0]
    results = []
    for fused in (kernels, None):
        arch, _ = architecture_for(model)
        assert arch is not None
        plan = WeightPlan.single(fmt)
        factory = LinearFactory(
            plan, torch.bfloat16, torch.device("cpu"), input_ranges=lambda: input_ranges(model, _RandomTokens()),
            fused=fused,
        )
        core = DecodeCore(model, arch, plan, factory, slots=4, capacity=64, fused=fused)
        assert core._fused_applies(1, 20) == (fused is not None)
        results.append(core.prefill([core.allocate()], [ids])[0])
    fused_logits, eager_logits = results
    assert torch.isfinite(fused_logits).all()
    assert F.cosine_similarity(fused_logits, eager_logits, dim=0) > 0.99
    assert F.cosine_similarity(fused_logits, reference_logits(model, ids), dim=0) > 0.85
