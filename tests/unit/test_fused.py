"""fused.c: the Llama decode step through the fused kernels against the PyTorch path, on a tiny Llama."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from tests.support.tiny_core import build_kernels, tiny_core, tiny_llama_model
from textgen.engine.core.decoder import DecodeCore
from textgen.engine.core.fused import FusedKernels, build_fused_kernels, load_fused_kernels, openmp_runtimes
from textgen.engine.core.linear import Q4Kernel, W8A8Kernel

PROMPTS = [[5, 17, 23, 9, 41, 3], [7, 7, 60], [11, 2, 90, 33, 8, 21, 64, 70, 12, 19, 1]]


@pytest.fixture(scope="module")
def kernels(tmp_path_factory: pytest.TempPathFactory) -> FusedKernels:
    return build_kernels(tmp_path_factory.mktemp("fused"))


@pytest.fixture(scope="module")
def tiny_llama() -> LlamaForCausalLM:
    return tiny_llama_model()


def core_of(model: LlamaForCausalLM, dtype: torch.dtype, fused: FusedKernels | None, slots: int = 4) -> DecodeCore:
    return tiny_core(model, dtype, fused, slots=slots)


def decode_logits(core: DecodeCore, steps: int) -> list[torch.Tensor]:
    """Prefill PROMPTS (rows of different lengths), free the middle one, then greedy decode steps."""
    slots = [core.allocate() for _ in PROMPTS]
    tokens = core.prefill(slots, PROMPTS).argmax(-1)
    core.free([slots[1]])  # the last row moves into the hole: rows stay dense, lengths mixed
    live = [slots[0], slots[2]]
    tokens = tokens[[0, 2]]
    out = []
    with torch.inference_mode():
        for _ in range(steps):
            logits = core.decode(live, tokens)
            out.append(logits.float())
            tokens = logits.argmax(-1)  # the float32 reference's tokens would do as well; these are exact
    core.free(live)
    return out


def test_fused_decode_is_as_close_to_float32_as_the_pytorch_bf16_path(
    tiny_llama: LlamaForCausalLM, kernels: FusedKernels
) -> None:
    reference = decode_logits(core_of(tiny_llama, torch.float32, None), steps=6)
    eager = decode_logits(core_of(tiny_llama, torch.bfloat16, None), steps=6)
    fused_core = core_of(tiny_llama, torch.bfloat16, kernels)
    assert fused_core.describe()["fused_kernels"] is True
    fused = decode_logits(fused_core, steps=6)
    for ref, slow, fast in zip(reference, eager, fused, strict=True):
        eager_error = (slow - ref).abs().max()
        fused_error = (fast - ref).abs().max()
        # bf16 keeps 8 bits: both paths differ from float32 by rounding; fused.c rounds once per
        # operation group instead of after every operator, so it is no further off.
        assert fused_error <= 1.5 * eager_error + 1e-3, (fused_error, eager_error)
        assert torch.nn.functional.cosine_similarity(fast, ref, dim=-1).min() > 0.999


def test_fused_kernels_are_cached_and_a_missing_compiler_falls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    assert load_fused_kernels(tmp_path) is not None
    built = list(tmp_path.glob("fused-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    assert load_fused_kernels(tmp_path) is not None
    assert built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with caplog.at_level(logging.WARNING):
        assert load_fused_kernels(tmp_path / "elsewhere") is None
        assert load_fused_kernels(tmp_path / "elsewhere") is None  # the core and the sampler both ask
    assert caplog.text.count("Fused CPU kernels off") == 1  # logged once, with the reason and the fix
    assert "the build failed" in caplog.text and "fix: check that CC compiles C" in caplog.text
    monkeypatch.delenv("CC")
    monkeypatch.setattr("shutil.which", lambda name: None)
    with caplog.at_level(logging.WARNING):
        assert build_fused_kernels(tmp_path / "third").problem.startswith("no C compiler found; fix: install gcc")


def test_prefill_decode_and_mixed_steps_all_run_fused(tiny_llama: LlamaForCausalLM, kernels: FusedKernels) -> None:
    """Prompts, decode rows, and both in one step go through fused.c (every token at its own cache row and
    position), and match the PyTorch path as closely as its bf16 rounding allows."""
    fused_core = core_of(tiny_llama, torch.bfloat16, kernels)
    eager_core = core_of(tiny_llama, torch.bfloat16, None)
    reference = core_of(tiny_llama, torch.float32, None)
    calls = []
    arch = fused_core._arch
    original = arch.step_fused
    assert original is not None

    def counting(*args: object, **keywords: object) -> torch.Tensor:
        calls.append(args[1])
        return original(*args, **keywords)

    def run(core: DecodeCore) -> list[torch.Tensor]:
        first = [core.allocate() for _ in PROMPTS[:2]]
        prefill = core.prefill(first, PROMPTS[:2])
        late = core.allocate()
        mixed = core.step(first, prefill.argmax(-1), [late], [PROMPTS[2]])  # decode 2 rows + prefill 1
        return [prefill.float(), mixed.float()]

    object.__setattr__(arch, "step_fused", counting)
    try:
        fast = run(fused_core)
    finally:
        object.__setattr__(arch, "step_fused", original)
    assert [len(tokens) for tokens in calls] == [len(PROMPTS[0]) + len(PROMPTS[1]), 2 + len(PROMPTS[2])]
    for ref, slow, quick in zip(run(reference), run(eager_core), fast, strict=True):
        assert (quick - ref).abs().max() <= 1.5 * (slow - ref).abs().max() + 1e-3
        assert torch.nn.functional.cosine_similarity(quick, ref, dim=-1).min() > 0.999
    assert arch.fused_supported(fused_core.weights, 64, 10)  # type: ignore[misc]
    assert not arch.fused_supported(fused_core.weights, 1, 10_000)  # type: ignore[misc]


def test_loading_the_kernels_leaves_subnormal_floats_alone(kernels: FusedKernels) -> None:
    """A library linked with -ffast-math would switch the whole process to flush-to-zero on load."""
    import ctypes

    tiny = ctypes.c_float(1e-39).value  # a subnormal float32
    assert tiny != 0.0
    assert float(torch.tensor(1e-39, dtype=torch.float32)) != 0.0
    assert 5e-324 / 2 == 0.0 and 5e-324 > 0.0  # float64 subnormals still exist


@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_w8a8_through_fused_c_matches_the_pytorch_operators(
    kernels: FusedKernels, in_dtype: torch.dtype, out_dtype: torch.dtype
) -> None:
    """Quantize + integer product + rescale in fused.c computes what W8A8Kernel's PyTorch path does."""
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(1100, 96, generator=generator)  # 1100 outputs: more than two column chunks
    bias = torch.randn(1100, generator=generator)
    outliers = torch.tensor([4, 50, 77])
    x = torch.randn(37, 96, generator=generator)
    x[:, 50] *= 40.0  # an outlier channel, as in a residual stream
    x = x.to(in_dtype)
    plain = W8A8Kernel.quantize(weight, bias, outliers)
    fused = W8A8Kernel.quantize(weight, bias, outliers, kernels, in_dtype, out_dtype)
    expected = plain(x.float())
    got = fused(x)
    assert got.dtype == out_dtype and got.shape == expected.shape
    # The integers agree exactly (same rounding); the float rescale differs by rounding order, and a
    # bf16 output by its own 8-bit rounding.
    tolerance = 1e-4 if out_dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), expected, rtol=tolerance, atol=tolerance * expected.abs().max())
    reference = x.float() @ weight.t() + bias
    assert (got.float() - reference).abs().max() < 0.05 * reference.abs().max()  # int8 error, not a bug


def test_threaded_fused_decode_is_identical_to_one_thread(tiny_llama: LlamaForCausalLM, kernels: FusedKernels) -> None:
    """A batch big enough for fused.c to share its loops with PyTorch's threads computes each row on one
    thread, so the result cannot depend on the thread count; and only one OpenMP runtime is loaded."""
    assert len(openmp_runtimes()) <= 1
    prompts = [[(7 * i + j) % 97 + 1 for j in range(40 + i % 5)] for i in range(48)]

    def run(threads: int) -> torch.Tensor:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            core = core_of(tiny_llama, torch.bfloat16, kernels, slots=48)
            slots = [core.allocate() for _ in prompts]
            tokens = core.prefill(slots, prompts).argmax(-1)
            return torch.stack([core.decode(slots, tokens := core.decode(slots, tokens).argmax(-1)) for _ in range(2)])
        finally:
            torch.set_num_threads(before)

    two, one = run(2), run(1)
    assert torch.equal(two, one)
    eager = core_of(tiny_llama, torch.bfloat16, None, slots=48)
    slots = [eager.allocate() for _ in prompts]
    tokens = eager.prefill(slots, prompts).argmax(-1)
    first = eager.decode(slots, tokens)
    assert torch.nn.functional.cosine_similarity(two[0].float(), first.float(), dim=-1).min() > 0.99


@pytest.mark.parametrize("rows", [1, 3, 4, 9])
def test_q4_blocks_times_int8_activations_match_the_dequantized_weights(kernels: FusedKernels, rows: int) -> None:
    """Q4Kernel (fused.c, AVX-512 VNNI) against x @ W.T with W the blocks' own values, w = d * q + m: the
    only error is the activations' int8 rounding per block of 32 (relative step 1/254 of a block's largest
    value), far below what a wrong nibble, lane or scale would cause."""
    if not kernels.q4_supported:
        pytest.skip("this CPU has no AVX-512 VNNI: Q4_1 blocks use Int4Kernel (tested in test_core.py)")
    generator = torch.Generator().manual_seed(7)
    n, k = 48, 96  # three tiles of 16 outputs, three blocks
    q = torch.randint(0, 16, (n, k), generator=generator)
    d = (torch.rand(n, k // 32, generator=generator) * 0.02 + 0.001).half().float()
    m = (-torch.rand(n, k // 32, generator=generator) * 0.1).half().float()
    weight = (q.float().reshape(n, k // 32, 32) * d[..., None] + m[..., None]).reshape(n, k)
    bias = torch.randn(n, generator=generator)
    x = torch.randn(rows, k, generator=generator)
    x[:, 40] *= 50.0  # an outlier channel, kept in float
    reference = x @ weight.t() + bias
    for dtype, out_dtype in [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)]:
        kernel = Q4Kernel.pack(q, d, m, bias, torch.tensor([5, 40]), kernels, dtype, out_dtype)
        got = kernel(x.to(dtype))
        assert got.dtype == out_dtype and got.shape == (rows, n)
        exact_input = x.to(dtype).float() @ weight.t() + bias
        bound = 3 * weight.abs().sum(dim=1).max() * x.abs().max() / 254
        if out_dtype == torch.bfloat16:
            bound = bound + 0.01 * reference.abs().max()  # the output's own 8-bit rounding
        assert (got.float() - exact_input).abs().max() < bound
        assert torch.nn.functional.cosine_similarity(got.float(), reference, dim=-1).min() > 0.999
    wrong = Q4Kernel.pack(q.roll(1, dims=1), d, m, bias, torch.tensor([5, 40]), kernels, torch.float32, torch.float32)
    assert (wrong(x) - reference).abs().max() > 10 * (got.float() - reference).abs().max()  # the test can fail
