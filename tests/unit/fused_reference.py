"""PyTorch references for fused.c's kernels, and ``exercise``: every kernel on small shapes against them.

Shared by tests/unit/test_fused_kernels.py (the native and the scalar build, in process) and
tests/unit/test_fused_sanitized.py (the ASan/UBSan build, in a subprocess with libasan preloaded: run as
``python -m tests.unit.fused_reference FOLDER [--overflow]``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from textgen.engine.core.fused import FusedKernels

HEAD_DIM = 64


@dataclass
class AttentionCase:
    """One call's inputs: a prompt prefilled into one cache row while other rows decode one token each."""

    qkv: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    positions: torch.Tensor
    cache_rows: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    heads: int
    scale: float

    @property
    def kv_heads(self) -> int:
        return self.keys.shape[1]

    @property
    def dim(self) -> int:
        return self.keys.shape[3]


def attention_case(heads: int, kv_heads: int, dim: int = HEAD_DIM, prompt: int = 20, seed: int = 0) -> AttentionCase:
    """Cache row 1 prefills `prompt` tokens (positions 0..prompt-1, attending each other causally); rows 0 and
    2 decode at positions 37 and 5 over keys already cached (more than 16 positions: the vector path's
    blocks of 16 and its tail both run)."""
    generator = torch.Generator().manual_seed(seed)
    slots, capacity, angles = 3, 48, 64
    positions = [37, *range(prompt), 5]
    rows = [0, *[1] * prompt, 2]
    qkv = torch.randn(len(rows), (heads + 2 * kv_heads) * dim, generator=generator).bfloat16()
    angle = torch.arange(angles)[:, None] * (1.0 / 10000 ** (torch.arange(dim // 2) * 2 / dim))[None, :]
    angle = torch.cat([angle, angle], dim=1)
    cache = torch.randn(2, slots, kv_heads, capacity, dim, generator=generator).bfloat16()
    return AttentionCase(
        qkv, angle.cos().bfloat16(), angle.sin().bfloat16(), torch.tensor(positions), torch.tensor(rows),
        cache[0].contiguous(), cache[1].contiguous(), heads, dim**-0.5,
    )


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Split-half rotary embedding of x [..., D] bf16, each half rounded to bf16 (as fused.c)."""
    half = x.shape[-1] // 2
    a, b = x[..., :half].float(), x[..., half:].float()
    c, s = cos.float(), sin.float()
    first = (a * c[..., :half] - b * s[..., :half]).bfloat16()
    second = (b * c[..., half:] + a * s[..., half:]).bfloat16()
    return torch.cat([first, second], dim=-1)


def reference_attention(case: AttentionCase) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out [B, H D], keys, values) as fused.c's rotary_cache_attention computes them, in PyTorch."""
    heads, kv_heads, dim = case.heads, case.kv_heads, case.dim
    keys, values = case.keys.clone(), case.values.clone()
    q = case.qkv[:, : heads * dim].reshape(-1, heads, dim)
    k = case.qkv[:, heads * dim : (heads + kv_heads) * dim].reshape(-1, kv_heads, dim)
    v = case.qkv[:, (heads + kv_heads) * dim :].reshape(-1, kv_heads, dim)
    for r, (pos, row) in enumerate(zip(case.positions.tolist(), case.cache_rows.tolist(), strict=True)):
        keys[row, :, pos] = _rotate(k[r], case.cos[pos], case.sin[pos])
        values[row, :, pos] = v[r]
    out = torch.empty(case.qkv.shape[0], heads * dim, dtype=torch.bfloat16)
    group = heads // kv_heads
    for r, (pos, row) in enumerate(zip(case.positions.tolist(), case.cache_rows.tolist(), strict=True)):
        for h in range(heads):
            g = h // group
            query = _rotate(q[r, h], case.cos[pos], case.sin[pos]).float()
            scores = (keys[row, g, : pos + 1].float() @ query) * case.scale
            out[r, h * dim : (h + 1) * dim] = (scores.softmax(-1) @ values[row, g, : pos + 1].float()).bfloat16()
    return out, keys, values


def run_attention(kernels: FusedKernels, case: AttentionCase) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    keys, values = case.keys.clone(), case.values.clone()
    out = torch.empty(case.qkv.shape[0], case.heads * case.dim, dtype=torch.bfloat16)
    kernels.rotary_cache_attention(
        case.qkv, case.cos, case.sin, case.positions, case.cache_rows, keys, values, out, case.heads, case.scale
    )
    return out, keys, values


def check_attention(kernels: FusedKernels, heads: int, kv_heads: int, dim: int = HEAD_DIM) -> None:
    case = attention_case(heads, kv_heads, dim)
    out, keys, values = run_attention(kernels, case)
    want_out, want_keys, want_values = reference_attention(case)
    assert torch.equal(values, want_values)
    # The rotation's products may be fused (FMA) in C: a key can differ by one bf16 step.
    torch.testing.assert_close(keys.float(), want_keys.float(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out.float(), want_out.float(), rtol=2e-2, atol=2e-2)


def check_paged_attention(kernels: FusedKernels, heads: int, kv_heads: int, block_size: int, seed: int = 3) -> None:
    """The case's [S, H, T, D] cache cut into blocks of ``block_size`` positions, shuffled through a pool with
    one spare block: the kernel reads and writes through the block tables exactly as over the rows."""
    case = attention_case(heads, kv_heads)
    want_out, want_keys, want_values = run_attention(kernels, case)
    slots, _, capacity, dim = case.keys.shape
    per_slot = capacity // block_size
    assert per_slot * block_size == capacity
    order = torch.randperm(slots * per_slot + 1, generator=torch.Generator().manual_seed(seed))[: slots * per_slot]
    tables = order.view(slots, per_slot).contiguous()  # block (slot, j) is tables[slot, j]

    def paged(cache: torch.Tensor) -> torch.Tensor:
        blocks = cache.view(slots, kv_heads, per_slot, block_size, dim).transpose(1, 2)
        pool = torch.zeros(slots * per_slot + 1, kv_heads, block_size, dim, dtype=cache.dtype)
        pool[order] = blocks.reshape(-1, kv_heads, block_size, dim)
        return pool

    keys, values = paged(case.keys), paged(case.values)
    out = torch.empty_like(want_out)
    kernels.rotary_cache_attention(
        case.qkv, case.cos, case.sin, case.positions, case.cache_rows, keys, values, out, case.heads, case.scale,
        tables,
    )
    assert torch.equal(out, want_out)
    assert torch.equal(keys, paged(want_keys)) and torch.equal(values, paged(want_values))


def check_row_grouping(kernels: FusedKernels, heads: int, kv_heads: int, dim: int, block_size: int, window: int,
                       seed: int = 5) -> None:
    """Each row's output (and the cache it writes) is the same bit for bit however rows are grouped into
    calls: two sequences prefilled one row per call, in random chunks (each call mixing both sequences' rows,
    so tiles of one sequence's rows form and break), and all in one call, through a shuffled block pool."""
    generator = torch.Generator().manual_seed(seed)
    lengths, capacity, angles = (45, 38), 48, 64
    per_sequence = -(-capacity // block_size)
    order = torch.randperm(2 * per_sequence + 1, generator=generator)[: 2 * per_sequence]
    tables = order.view(2, per_sequence).contiguous()
    qkv = [torch.randn(n, (heads + 2 * kv_heads) * dim, generator=generator).bfloat16() for n in lengths]
    angle = torch.arange(angles)[:, None] * (1.0 / 10000 ** (torch.arange(dim // 2) * 2 / dim))[None, :]
    cos, sin = torch.cat([angle, angle], dim=1).cos().bfloat16(), torch.cat([angle, angle], dim=1).sin().bfloat16()

    Row = tuple[int, int]  # (sequence, position)

    def run(calls: list[list[Row]]) -> tuple[dict[Row, torch.Tensor], torch.Tensor, torch.Tensor]:
        keys = torch.zeros(2 * per_sequence + 1, kv_heads, block_size, dim, dtype=torch.bfloat16)
        values = torch.zeros_like(keys)
        outs: dict[Row, torch.Tensor] = {}
        for call in calls:
            out = torch.empty(len(call), heads * dim, dtype=torch.bfloat16)
            kernels.rotary_cache_attention(
                torch.stack([qkv[s][p] for s, p in call]), cos, sin, torch.tensor([p for _, p in call]),
                torch.tensor([s for s, _ in call]), keys, values, out, heads, dim**-0.5, tables, window=window,
            )
            outs.update({row: out[i] for i, row in enumerate(call)})
        return outs, keys, values

    alone = [[(s, p)] for p in range(max(lengths)) for s in (0, 1) if p < lengths[s]]
    chunked: list[list[Row]] = []
    done = [0, 0]
    while done != list(lengths):
        call = []
        for s in torch.randperm(2, generator=generator).tolist():
            take = min(int(torch.randint(0, 21, (1,), generator=generator)), lengths[s] - done[s])
            call += [(s, p) for p in range(done[s], done[s] + take)]
            done[s] += take
        if call:
            chunked.append(call)
    whole = [[(s, p) for s in (0, 1) for p in range(lengths[s])]]
    want, want_keys, want_values = run(alone)
    for calls in (chunked, whole):
        outs, keys, values = run(calls)
        assert torch.equal(keys, want_keys) and torch.equal(values, want_values)
        for row, expected in want.items():
            assert torch.equal(outs[row], expected), f"row {row} differs when grouped ({len(calls)} calls)"


def rms_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.float()
    return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).bfloat16()


def quantize_reference(x: torch.Tensor, outliers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = x.float()
    outlying = x[:, outliers]
    rest = x.index_fill(1, outliers, 0.0)
    row_max = rest.abs().amax(-1, keepdim=True).clamp(min=1e-12)
    q = (rest * (127.0 / row_max)).round().to(torch.int8)
    return q, row_max, outlying


def exercise(kernels: FusedKernels) -> None:
    """Every kernel on small shapes, each against its reference (or a property where rounding differs)."""
    generator = torch.Generator().manual_seed(1)
    for heads, kv_heads, dim in [(2, 2, 64), (4, 2, 64), (6, 2, 64), (8, 2, 64), (4, 2, 32), (3, 1, 16)]:
        check_attention(kernels, heads, kv_heads, dim)
    for block_size in (16, 8, 3):  # the vector path's whole blocks of 16, and tails inside every block
        check_paged_attention(kernels, 6, 2, block_size)
    # rows grouped into calls any way give the same bits: chained scores (group 3, 8), the others (1, 2, dim 16)
    for heads, kv_heads, dim, block_size, window in [(9, 3, 64, 16, 0), (9, 3, 64, 3, 7), (16, 2, 64, 32, 0),
                                                     (4, 2, 64, 8, 0), (3, 1, 16, 16, 5)]:
        check_row_grouping(kernels, heads, kv_heads, dim, block_size, window)

    x = torch.randn(5, 96, generator=generator).bfloat16()
    delta = torch.randn(5, 96, generator=generator).bfloat16()
    weight = torch.randn(96, generator=generator).bfloat16()
    out = torch.empty_like(x)
    summed = x.clone()
    kernels.add_rms_norm(summed, delta, weight, out, 1e-5)
    assert torch.equal(summed, (x.float() + delta.float()).bfloat16())
    torch.testing.assert_close(out.float(), rms_reference(summed, weight, 1e-5).float(), rtol=2e-2, atol=2e-2)

    gate_up = torch.randn(3, 2 * 40, generator=generator).bfloat16()
    activated = torch.empty(3, 40, dtype=torch.bfloat16)
    kernels.silu_mul(gate_up, activated)
    expected = torch.nn.functional.silu(gate_up[:, :40].float()) * gate_up[:, 40:].float()
    torch.testing.assert_close(activated.float(), expected, rtol=2e-2, atol=2e-2)

    activated = torch.empty(3, 40, dtype=torch.bfloat16)
    kernels.gelu_tanh_mul(gate_up, activated)
    expected = torch.nn.functional.gelu(gate_up[:, :40].float(), approximate="tanh") * gate_up[:, 40:].float()
    torch.testing.assert_close(activated.float(), expected, rtol=2e-2, atol=2e-2)

    # Sliding window and head norms (Gemma 3): the window shorter than most rows' live lengths; the full
    # comparison with a reference is in test_gemma3.py, here the memory it touches is what is checked.
    case = attention_case(4, 2)
    keys, values = case.keys.clone(), case.values.clone()
    attended = torch.empty(case.qkv.shape[0], 4 * case.dim, dtype=torch.bfloat16)
    norm = torch.rand(case.dim, generator=generator).bfloat16()
    kernels.rotary_cache_attention(
        case.qkv, case.cos, case.sin, case.positions, case.cache_rows, keys, values, attended, 4, case.scale,
        window=7, q_norm=norm, k_norm=norm,
    )
    assert torch.isfinite(attended.float()).all()

    outliers = torch.tensor([3, 70])
    rows = torch.randn(4, 96, generator=generator)
    quantized = kernels.quantize_rows(rows, outliers)
    q, row_max, outlying = quantize_reference(rows, outliers)
    assert torch.equal(quantized.outlying, outlying) and torch.allclose(quantized.row_max, row_max)
    assert (quantized.q.int() - q.int()).abs().max() <= 1

    cols = 80  # a full tile of 64 columns and a ragged one
    acc = torch.randint(-5000, 5000, (4, cols), dtype=torch.int32, generator=generator)
    col_scale, bias = torch.rand(cols, generator=generator) / 127, torch.randn(cols, generator=generator)
    outlier_weight_t = torch.randn(2, cols, generator=generator)
    rescaled = kernels.dequantize_rows(acc, row_max, col_scale, outlying, outlier_weight_t, bias, torch.float32)
    want = acc.float() * row_max * col_scale + outlying @ outlier_weight_t + bias
    torch.testing.assert_close(rescaled, want, rtol=1e-4, atol=1e-3)

    layer = _Layer(torch.rand(96, generator=generator) / 127, outliers, torch.randn(2, 96, generator=generator), None)
    residual = torch.randn(4, 96, generator=generator).bfloat16()
    acc96 = torch.randint(-5000, 5000, (4, 96), dtype=torch.int32, generator=generator)
    normed = torch.empty_like(residual)
    before = residual.clone()
    assert kernels.residual_norm_quantize(residual, (acc96, quantized, layer), weight, 1e-5, None, normed) is None
    step = acc96.float() * quantized.row_max * layer.scales + quantized.outlying @ layer.outlier_weight_t
    torch.testing.assert_close(residual.float(), (before.float() + step).bfloat16().float(), rtol=2e-2, atol=5e-2)
    into_next = kernels.residual_norm_quantize(residual, None, weight, 1e-5, layer)
    assert into_next is not None
    q_next, max_next, _ = quantize_reference(rms_reference(residual, weight, 1e-5), outliers)
    assert (into_next.q.int() - q_next.int()).abs().max() <= 2
    torch.testing.assert_close(into_next.row_max, max_next, rtol=2e-2, atol=1e-3)

    features = 48
    wide = _Layer(torch.rand(2 * features, generator=generator) / 127, outliers,
                  torch.randn(2, 2 * features, generator=generator), torch.randn(2 * features, generator=generator))
    acc_wide = torch.randint(-5000, 5000, (4, 2 * features), dtype=torch.int32, generator=generator)
    down = _Layer(torch.rand(features, generator=generator), torch.tensor([1, 40]), torch.randn(2, features), None)
    middle = kernels.silu_quantize(acc_wide, quantized, wide, down)
    gate_up_f = acc_wide.float() * quantized.row_max * wide.scales + quantized.outlying @ wide.outlier_weight_t
    gate_up_f = gate_up_f + wide.bias
    q_mid, max_mid, out_mid = quantize_reference(
        torch.nn.functional.silu(gate_up_f[:, :features]) * gate_up_f[:, features:], down.outliers
    )
    assert (middle.q.int() - q_mid.int()).abs().max() <= 1
    torch.testing.assert_close(middle.row_max, max_mid, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(middle.outlying, out_mid, rtol=1e-3, atol=1e-4)

    logits = torch.randn(3, 200, generator=generator)
    logits[:, 150:] = float("-inf")  # refused tokens (a grammar mask)
    logits[0, 7] = 50.0  # one token holds all the mass
    chosen = kernels.sample_nucleus(
        logits, torch.ones(3), torch.tensor([0.9, 1.0, 0.5]), torch.rand(3, 8, generator=generator)
    )
    assert chosen[0] == 7 and ((chosen[1:] >= 0) & (chosen[1:] < 150)).all(), chosen

    if kernels.q4_supported:
        n, k = 32, 64
        nibbles = torch.randint(0, 16, (n, k), generator=generator)
        d = (torch.rand(n, k // 32, generator=generator) * 0.02 + 0.001).half().float()
        m = (-torch.rand(n, k // 32, generator=generator) * 0.1).half().float()
        from textgen.engine.core.linear import Q4Kernel

        kernel = Q4Kernel.pack(nibbles, d, m, None, torch.tensor([2, 50]), kernels, torch.float32, torch.float32)
        w = (nibbles.float().reshape(n, k // 32, 32) * d[..., None] + m[..., None]).reshape(n, k)
        x4 = torch.randn(3, k, generator=generator)
        assert torch.nn.functional.cosine_similarity(kernel(x4), x4 @ w.t(), dim=-1).min() > 0.999
        from textgen.engine.core.linear import Q8Kernel

        codes = torch.randint(0, 256, (n, k), generator=generator)
        d8 = torch.rand(n, k // 16, generator=generator) * 0.01 + 0.001
        m8 = -torch.rand(n, k // 16, generator=generator)
        kernel8 = Q8Kernel.pack(codes, d8, m8, None, torch.tensor([2, 50]), kernels, torch.float32, torch.float32)
        w8 = (codes.float().reshape(n, k // 16, 16) * d8[..., None] + m8[..., None]).reshape(n, k)
        assert torch.nn.functional.cosine_similarity(kernel8(x4), x4 @ w8.t(), dim=-1).min() > 0.999

        # int8_matmul: a width with a masked tail (100 = 64 + 36), enough work for the parallel loop
        q8 = torch.randint(-128, 128, (4, 100), generator=generator).to(torch.int8)
        weight8 = torch.randint(-127, 128, (400, 100), generator=generator).to(torch.int8)
        assert torch.equal(kernels.int8_matmul(q8, weight8.t()), (q8.long() @ weight8.t().long()).int())


@dataclass
class _Layer:
    """A w8a8 layer's constants (fused.W8A8Weights)."""

    scales: torch.Tensor
    outliers: torch.Tensor
    outlier_weight_t: torch.Tensor
    bias: torch.Tensor | None


def overflow(kernels: FusedKernels) -> None:
    """A call past the boundary checks, straight into C with an output one row short: a bug the sanitized
    build must report (the negative control of test_fused_sanitized)."""
    x = torch.randn(4, 64).bfloat16()
    out = torch.empty(3, 64, dtype=torch.bfloat16)
    weight = torch.ones(64, dtype=torch.bfloat16)
    kernels.library.add_rms_norm(x.data_ptr(), None, weight.data_ptr(), out.data_ptr(), 4, 64, 1e-5)


# Printed once every kernel has run: a sanitizer report aborts the run, so it means none was made.
EXERCISED = "every kernel exercised"


def main(argv: list[str]) -> int:
    """Build the sanitized library into FOLDER and exercise it; with ``--overflow`` then make the overflowing
    call too (in the same process: importing PyTorch under ASan is most of a run's cost)."""
    from textgen.engine.core.fused import SANITIZE, build_fused_kernels

    build = build_fused_kernels(Path(argv[0]), SANITIZE, at_setup=True)
    assert build.kernels is not None, build.problem
    exercise(build.kernels)
    print(EXERCISED, flush=True)
    if "--overflow" in argv:
        overflow(build.kernels)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
