"""The 8-bit block kernel (fused.c q8_matmul, linear.Q8Kernel) and outlier channels added after packing
(Q4Kernel / Q8Kernel.with_outliers), against exact float references of the same arithmetic."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from textgen.engine.core.fused import FusedArgumentError, FusedKernels, build_fused_kernels
from textgen.engine.core.linear import Q4Kernel, Q8Kernel, W8A8Kernel

OUT, K, ROWS = 48, 256, 7


@pytest.fixture(scope="module")
def fused() -> FusedKernels:
    built = build_fused_kernels()
    if built.kernels is None or not built.kernels.q4_supported:
        pytest.fail(f"fused.c with AVX-512 VNNI is needed on this machine: {built.problem or 'no VNNI'}")
    return built.kernels


def _activations_quantized(x: torch.Tensor, group: int, outliers: torch.Tensor) -> torch.Tensor:
    """x as the kernel sees it: outlier channels zeroed, the rest rounded to int8 per group of columns."""
    rest = x.clone()
    rest[:, outliers] = 0
    g = rest.reshape(x.shape[0], -1, group)
    largest = g.abs().amax(-1, keepdim=True)
    step = torch.where(largest > 0, 127 / largest, torch.zeros_like(largest))
    return (torch.round(g * step) * (largest / 127)).reshape(x.shape)


def _expected(x: torch.Tensor, w: torch.Tensor, m: torch.Tensor, group: int, outliers: torch.Tensor) -> torch.Tensor:
    """sum d*q*xq + m*sum(x) per group, plus the outlier channels in float (float64 reference)."""
    xq = _activations_quantized(x, group, outliers).double()
    rest = x.clone()
    rest[:, outliers] = 0
    sums_q = xq.reshape(x.shape[0], -1, group).sum(-1)
    sums_x = rest.double().reshape(x.shape[0], -1, group).sum(-1)
    m_per_group = m.double().repeat_interleave(group // 16, dim=1) if group > 16 else m.double()
    correction = (sums_x - sums_q) @ m_per_group.t()  # the kernel adds m times the unquantized sums
    floats = x[:, outliers].double() @ w[:, outliers].double().t()
    return xq @ w.double().t() + correction + floats


@pytest.mark.parametrize("exact_in_f16", [True, False])
def test_q8_kernel_matches_its_arithmetic(fused: FusedKernels, exact_in_f16: bool) -> None:
    torch.manual_seed(1)
    q = torch.randint(0, 256, (OUT, K), dtype=torch.uint8)
    d = torch.rand(OUT, K // 16) * 0.01 + 1e-4
    m = torch.randn(OUT, K // 16) * 0.1
    if exact_in_f16:  # Q8_0 / Q5_0 style: d and m survive float16, which the kernel then stores
        d, m = d.half().float(), m.half().float()
    w = (q.float().reshape(OUT, -1, 16) * d[..., None] + m[..., None]).reshape(OUT, K)
    outliers = torch.tensor([3, 100, 255])
    kernel = Q8Kernel.pack(q, d, m, None, outliers, fused, torch.float32, torch.float32)
    assert kernel.scales.dtype == (torch.float16 if exact_in_f16 else torch.float32)
    x = torch.randn(ROWS, K)
    x[:, 7] *= 50  # a massive channel in one group: only its own group loses levels
    got = kernel(x).double()
    want = _expected(x, w, m, 16, outliers)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    torch.testing.assert_close(kernel(x[:1]).double(), got[:1], rtol=1e-6, atol=1e-6)  # rows independent


def test_outliers_added_after_packing_equal_packed_ones(fused: FusedKernels) -> None:
    torch.manual_seed(2)
    channels = torch.tensor([0, 17, 31, 200])
    x = torch.randn(ROWS, K)
    q4 = torch.randint(0, 16, (OUT, K), dtype=torch.uint8)
    d4, m4 = torch.rand(OUT, K // 32).half().float() * 0.02, torch.randn(OUT, K // 32).half().float() * 0.1
    late4 = Q4Kernel.pack(q4, d4, m4, None, torch.empty(0, dtype=torch.long), fused, torch.float32, torch.float32)
    late4.with_outliers(channels)
    early4 = Q4Kernel.pack(q4, d4, m4, None, channels, fused, torch.float32, torch.float32)
    torch.testing.assert_close(late4.outlier_weight_t, early4.outlier_weight_t, rtol=0, atol=0)
    torch.testing.assert_close(late4(x), early4(x), rtol=0, atol=0)
    q8 = torch.randint(0, 256, (OUT, K), dtype=torch.uint8)
    d8, m8 = torch.rand(OUT, K // 16) * 0.01, torch.randn(OUT, K // 16) * 0.1
    late8 = Q8Kernel.pack(q8, d8, m8, None, torch.empty(0, dtype=torch.long), fused, torch.float32, torch.float32)
    late8.with_outliers(channels)
    early8 = Q8Kernel.pack(q8, d8, m8, None, channels, fused, torch.float32, torch.float32)
    torch.testing.assert_close(late8.outlier_weight_t, early8.outlier_weight_t, rtol=0, atol=0)
    torch.testing.assert_close(late8(x), early8(x), rtol=0, atol=0)


def test_q8_kernel_refuses_bad_shapes_before_any_c_runs(fused: FusedKernels) -> None:
    q = torch.randint(0, 256, (OUT, K), dtype=torch.uint8)
    kernel = Q8Kernel.pack(q, torch.ones(OUT, K // 16), torch.zeros(OUT, K // 16), None,
                           torch.empty(0, dtype=torch.long), fused, torch.float32, torch.float32)  # fmt: skip
    with pytest.raises(FusedArgumentError):
        kernel(torch.randn(2, K - 32))
    with pytest.raises(FusedArgumentError):
        fused.q8_matmul(torch.randn(2, K), dataclasses.replace(kernel, packed=kernel.packed[:1]), torch.float32)


def test_block_products_of_different_shapes_in_turn_keep_their_own_results(fused: FusedKernels) -> None:
    """fused.c allocates each call's quantized activations itself: consecutive calls of other widths, row
    counts and group sizes give what each gives alone, and never write into a result already returned."""
    torch.manual_seed(4)
    q4 = Q4Kernel.quantize(torch.randn(OUT, K), None, torch.tensor([5, 130]), fused, torch.float32, torch.float32)
    wide = 2 * K
    q8 = Q8Kernel.pack(torch.randint(0, 256, (32, wide), dtype=torch.uint8), torch.rand(32, wide // 16) * 0.01,
                       torch.randn(32, wide // 16) * 0.1, None, torch.tensor([1, 2, 300]), fused, torch.float32,
                       torch.float32)
    calls = [(q4, torch.randn(ROWS, K)), (q8, torch.randn(1, wide)), (q4, torch.randn(1, K)),
             (q8, torch.randn(2 * ROWS, wide)), (q4, torch.randn(ROWS + 2, K))]
    alone = [kernel(x).clone() for kernel, x in calls]
    results = [kernel(x) for kernel, x in calls]  # back to back, every result kept
    for got, want in zip(results, alone, strict=True):
        assert torch.equal(got, want)
    assert len({r.data_ptr() for r in results}) == len(results)


@pytest.mark.parametrize("rows", [1, 2, 4])
def test_int8_matmul_is_the_exact_integer_product(fused: FusedKernels, rows: int) -> None:
    """fused.c's few-row int8 product (the w8a8 head at decode) gives exactly the int64 product, extremes and
    a width that is no multiple of 64 included, and what torch._int_mm gives where PyTorch's path runs."""
    torch.manual_seed(5)
    k = 200
    weight = torch.randint(-127, 128, (80, k), dtype=torch.int8)
    q = torch.randint(-128, 128, (rows, k), dtype=torch.int8)
    q[0], weight[0] = 127, -127  # the largest products, all of one sign
    got = fused.int8_matmul(q, weight.t())
    assert torch.equal(got, (q.long() @ weight.t().long()).int())
    kernel = W8A8Kernel.quantize(torch.randn(48, 64), None, torch.tensor([2]), fused, torch.bfloat16, torch.float32)
    quantized = fused.quantize_rows(torch.randn(rows, 64).to(torch.bfloat16), kernel.outliers)
    padded = torch.cat([quantized.q, quantized.q.new_zeros(32, 64)])  # _int_mm's CPU path wants > 16 rows
    assert torch.equal(kernel.product(quantized), torch._int_mm(padded, kernel.qweight_t)[:rows])


def test_int8_matmul_refuses_more_rows_and_a_weight_not_laid_out_as_w8a8_keeps_it(fused: FusedKernels) -> None:
    weight = torch.zeros(32, 64, dtype=torch.int8)
    with pytest.raises(FusedArgumentError, match="at most"):
        fused.int8_matmul(torch.zeros(5, 64, dtype=torch.int8), weight.t())
    with pytest.raises(FusedArgumentError, match="not contiguous"):
        fused.int8_matmul(torch.zeros(1, 64, dtype=torch.int8), weight.t().contiguous())
    with pytest.raises(FusedArgumentError, match="shape"):
        fused.int8_matmul(torch.zeros(1, 32, dtype=torch.int8), weight.t())
