"""Linear layers in the weight formats the decode core can run: float, int8 and int4 (weight-only).

Each kernel is a small object with ``__call__(x) -> y`` for x [N, K] -> y [N, out]. A ``Linear`` holds
one kernel per weight format it was built with and picks one by the number of rows in x, because on a
CPU small batches are bound by reading weights (fewer bits win) while large batches are bound by
arithmetic (float kernels win). Which format serves which batch size is decided by measurement in
``calibrate.py``, not here.

W8A8 multiplies integers: int8 weights (one scale per output channel) by activations quantized to int8
per row at every call, with ``torch._int_mm`` (VNNI on x86), 2-4x faster than float32 at every batch
size on a CPU without AMX. A few input channels carry most of a transformer's activation range (the
"massive activations" of the residual stream); quantizing them with the rest would waste the int8
range of every row, so those channels, found once from a calibration text, are kept in float and
multiplied separately. Rows are quantized independently and integer products are exact, so a row's
result depends on the rest of its batch only through float rounding in that small outlier product.

Int4 uses PyTorch's group-32 CPU kernel: a weight is ``(q - 8) * scale + zero`` per group of 32 input
columns, q in 0..15. A GGUF Q4_1 block (``d * q + m``) maps onto it exactly with ``scale = d`` and
``zero = m + 8 d``, so a Q4_1 file keeps its own 4-bit blocks (only d and m + 8d are rounded to bf16).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, Self

import torch
import torch.nn.functional as F

from textgen.engine.core.fused import INT8_ROWS, FusedKernels, Quantized
from textgen.engine.core.fused import MAX_WIDTH as MAX_FUSED_WIDTH

FUSED_DTYPES = {torch.bfloat16, torch.float32}  # what fused.c's w8a8 helpers read and write
GROUP = 32  # input columns per int4 group; also the GGUF Q4_1 / Q8_0 block size

# The int4 CPU kernel; torch's own binding is ~1 us cheaper per call than the torch.ops lookup.
_int4_mm: Callable[[torch.Tensor, torch.Tensor, int, torch.Tensor], torch.Tensor] | None = getattr(
    torch, "_weight_int4pack_mm_for_cpu", None
) or getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)


class Kernel(Protocol):
    format: str

    @property
    def dtype(self) -> torch.dtype: ...  # the activation dtype the kernel computes in

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def nbytes(self) -> int: ...


@dataclass
class FloatKernel:
    """Plain dense weights; on CPU pre-packed once into oneDNN's blocked layout (no per-call reorder)."""

    weight: torch.Tensor  # [out, K], or oneDNN-packed when packed is True
    bias: torch.Tensor | None
    packed: bool = False
    format: str = "float"

    @classmethod
    def build(cls, weight: torch.Tensor, bias: torch.Tensor | None, *, pack: bool) -> FloatKernel:
        if pack and weight.device.type == "cpu" and _can_pack(weight.dtype):
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 64)
            return cls(packed, bias, packed=True)
        return cls(weight.contiguous(), bias)

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            packed: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
            return packed
        return F.linear(x, self.weight, self.bias)

    def nbytes(self) -> int:
        return _nbytes(self.weight, self.bias)


@dataclass
class Int8Kernel:
    """Weight-only int8 with one scale per output channel; activations in bf16."""

    qweight: torch.Tensor  # [out, K] int8
    scales: torch.Tensor  # [out] bf16
    bias: torch.Tensor | None
    format: str = "int8"
    dtype: torch.dtype = torch.bfloat16

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> Int8Kernel:
        w = weight.float()
        scales = (w.abs().amax(dim=1) / 127.0).clamp_(min=1e-12)  # [out]
        q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
        return cls(q, scales.to(torch.bfloat16), _as(bias, torch.bfloat16))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = torch.ops.aten._weight_int8pack_mm(x, self.qweight, self.scales)
        return y if self.bias is None else y + self.bias

    def nbytes(self) -> int:
        return _nbytes(self.qweight, self.scales, self.bias)


@dataclass
class W8A8Kernel:
    """int8 weights x int8 activations (per row, dynamic), plus a float product for the outlier channels.

    With ``fused`` (fused.c) the activations are quantized and the product rescaled in one call each, taking
    the input as it comes (bf16 or float32) and writing ``out_dtype``; otherwise ~10 PyTorch operators do it
    in float32.
    """

    qweight_t: torch.Tensor  # [K, out] int8, a transposed view of an [out, K] matrix (the fast layout)
    scales: torch.Tensor  # [out] float32: weight scale / 127 (the activations' step is row max / 127)
    outliers: torch.Tensor  # [k] long: input channels computed in float
    outlier_weight_t: torch.Tensor  # [k, out] float32
    bias: torch.Tensor | None
    fused: FusedKernels | None = None
    dtype: torch.dtype = torch.float32  # the input dtype taken without conversion
    out_dtype: torch.dtype = torch.float32  # with fused; PyTorch's path returns float32
    format: str = "w8a8"

    @classmethod
    def quantize(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        outliers: torch.Tensor,
        fused: FusedKernels | None = None,
        dtype: torch.dtype = torch.float32,
        out_dtype: torch.dtype = torch.float32,
    ) -> W8A8Kernel:
        """weight [out, K]; outliers [k] the input channels with the widest activation range; with fused,
        the activations come in dtype and results leave in out_dtype (bfloat16 or float32 each)."""
        w = weight.float()
        outliers = _outlier_channels(outliers, weight.shape[1])
        outlier_weight_t = w[:, outliers].t().contiguous()
        w = w.index_fill(1, outliers, 0.0)
        scales = (w.abs().amax(dim=1) / 127.0).clamp_(min=1e-12)  # [out]
        q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
        # Stored divided by 127 once more: the activations' own 1/127 is folded in, saving an op per call.
        kernel = cls(q.t(), scales / 127.0, outliers, outlier_weight_t, _as(bias, torch.float32))
        if fused is not None:
            assert {dtype, out_dtype} <= FUSED_DTYPES, (dtype, out_dtype)
            kernel.fused, kernel.dtype, kernel.out_dtype = fused, dtype, out_dtype
        return kernel

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # x [N, K] float32 (or self.dtype with fused)
        if self.fused is not None:
            quantized = self.fused.quantize_rows(x.contiguous(), self.outliers)
            return self.rescale(self.product(quantized), quantized, self.out_dtype)
        outlying = x.index_select(1, self.outliers)  # [N, k]
        rest = x.index_fill(1, self.outliers, 0.0)
        # abs().amax() rather than an inf-norm: the norm's reduction is ~6x slower on CPU.
        row_max = rest.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-12)  # [N, 1]
        # 127 / row_max as a true division (a scalar over a tensor would be a reciprocal times 127), as
        # fused.c computes it: both paths then round exactly the same products.
        q = rest.mul_(torch.full_like(row_max, 127.0).div_(row_max)).round_().to(torch.int8)  # [N, K]
        y = torch._int_mm(q, self.qweight_t).mul(row_max * self.scales)  # [N, out]; scales hold the 1/127
        y = y.addmm_(outlying, self.outlier_weight_t)
        return y if self.bias is None else y.add_(self.bias)

    def product(self, quantized: Quantized) -> torch.Tensor:
        """The integer product of rows quantized by fused.c: [N, K] int8 -> [N, out] int32. A few rows (decode)
        go through fused.c's int8_matmul, which streams the weight faster than _int_mm does at one row (the
        28 MB output head, from DRAM: ~1.2 vs ~1.9 ms on 2 vCPUs); integers, so the same result either way."""
        if self.fused is not None and quantized.q.shape[0] <= INT8_ROWS and self.fused.q4_supported:
            return self.fused.int8_matmul(quantized.q, self.qweight_t)
        return torch._int_mm(quantized.q, self.qweight_t)

    def rescale(self, acc: torch.Tensor, quantized: Quantized, out_dtype: torch.dtype) -> torch.Tensor:
        """The product's int32 result [N, out] as floats in out_dtype (fused.c), for rows quantized as given."""
        assert self.fused is not None
        return self.fused.dequantize_rows(
            acc, quantized.row_max, self.scales, quantized.outlying, self.outlier_weight_t, self.bias, out_dtype
        )

    def nbytes(self) -> int:
        return _nbytes(self.qweight_t, self.scales, self.outlier_weight_t, self.bias)


@dataclass
class Int4Kernel:
    """Weight-only int4, group 32: w = (q - 8) * scale + zero; activations, scales and zeros in bf16."""

    packed: torch.Tensor
    scales_and_zeros: torch.Tensor  # [K / 32, out, 2] bf16
    bias: torch.Tensor | None
    out_features: int
    format: str = "int4"
    dtype: torch.dtype = torch.bfloat16

    @classmethod
    def from_blocks(
        cls, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bias: torch.Tensor | None
    ) -> Int4Kernel:
        """q [out, K] ints in 0..15; scale, zero [out, K / 32] for w = (q - 8) * scale + zero."""
        out_features, k = q.shape
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
        scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()  # [K/32, out, 2]
        assert scales_and_zeros.shape == (k // GROUP, out_features, 2)
        return cls(packed, scales_and_zeros.to(torch.bfloat16), _as(bias, torch.bfloat16), out_features)

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> Int4Kernel:
        """Asymmetric min/max quantization per group of 32 (for weights that arrive as floats)."""
        out_features, k = weight.shape
        groups = weight.float().reshape(out_features, k // GROUP, GROUP)
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)  # [out, K/32]
        step = ((high - low) / 15.0).clamp_(min=1e-12)
        q = torch.round((groups - low[..., None]) / step[..., None]).clamp_(0, 15).reshape(out_features, k)
        return cls.from_blocks(q, step, low + 8 * step, bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if _int4_mm is None:
            raise RuntimeError("this PyTorch build has no int4 CPU kernel (_weight_int4pack_mm_for_cpu)")
        y = _int4_mm(x, self.packed, GROUP, self.scales_and_zeros)
        return y if self.bias is None else y + self.bias

    def nbytes(self) -> int:
        return _nbytes(self.packed, self.scales_and_zeros, self.bias)


_Packed = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # packed, scales, d, m


@dataclass
class _BlockKernel:
    """What Q4Kernel and Q8Kernel share: GGUF blocks packed for one of fused.c's block products (output rows in
    tiles of 16, one per vector lane), times activations quantized to int8, with a few outlier input channels
    multiplied in float from the blocks' own values. Each subclass has its layout (``_layout``), how it reads
    one channel back (``_channel``) and the C product it calls (``__call__``)."""

    packed: torch.Tensor  # [N/16, K/32, chunks, 16, 4] uint8
    scales: torch.Tensor  # [N/16, K/32, rows, 16]: the blocks' d and m
    outliers: torch.Tensor  # [k] long: input channels computed in float
    outlier_weight_t: torch.Tensor  # [k, N] float32: the blocks' values in those channels
    bias: torch.Tensor | None
    fused: FusedKernels
    out_dtype: torch.dtype = torch.bfloat16
    format: str = "int4"
    dtype: torch.dtype = torch.bfloat16

    SCALE_GROUP = GROUP  # weights per (d, m) pair

    @classmethod
    def pack(
        cls,
        q: torch.Tensor,
        d: torch.Tensor,
        m: torch.Tensor,
        bias: torch.Tensor | None,
        outliers: torch.Tensor,
        fused: FusedKernels,
        dtype: torch.dtype = torch.bfloat16,
        out_dtype: torch.dtype = torch.bfloat16,
    ) -> Self:
        """q [N, K] codes; d, m [N, K / SCALE_GROUP]: w = d * q + m; outliers [k] input channels. Activations
        arrive in dtype, results leave in out_dtype (bfloat16 or float32 each)."""
        packed, scales, d, m = cls._layout(q, d, m, q.shape[0] // 16, q.shape[1] // GROUP)
        outliers = _outlier_channels(outliers, q.shape[1])
        group_of = outliers // cls.SCALE_GROUP
        values = q[:, outliers].float() * d[:, group_of] + m[:, group_of]  # [N, k]
        bias = _as(bias, torch.float32)
        return cls(packed, scales, outliers, values.t().contiguous(), bias, fused, out_dtype, dtype=dtype)

    @classmethod
    def _layout(cls, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor, tiles: int, blocks: int) -> _Packed:
        """packed, scales, and d and m as the kernel will read them (float32, for the outlier values), for
        tiles of 16 output rows and blocks of 32 input columns."""
        raise NotImplementedError

    @staticmethod
    def fits(out_features: int, in_features: int, fused: FusedKernels | None) -> bool:
        shape_fits = out_features % 16 == 0 and in_features % GROUP == 0 and in_features <= MAX_FUSED_WIDTH
        return fused is not None and fused.q4_supported and shape_fits

    def with_outliers(self, channels: torch.Tensor) -> None:
        """Multiply these input channels in float from now on, with the blocks' own values (read back
        from the packed layout): for kernels built before their activations could be measured."""
        channels = _outlier_channels(channels, self.packed.shape[1] * GROUP)
        columns = [self._channel(*divmod(channel, GROUP)).reshape(-1) for channel in channels.tolist()]
        values = torch.stack(columns) if columns else torch.empty(0, self.packed.shape[0] * 16)  # [k, N]
        self.outliers, self.outlier_weight_t = channels, values.contiguous()

    def _channel(self, block: int, within: int) -> torch.Tensor:
        """The weights [N/16, 16] of input channel 32 * block + within, from the packed layout."""
        raise NotImplementedError

    def nbytes(self) -> int:
        return _nbytes(self.packed, self.scales, self.outlier_weight_t, self.bias)


@dataclass
class Q4Kernel(_BlockKernel):
    """GGUF Q4_1 blocks (w = d * q + m per 32 weights) times activations quantized to int8 per block of 32,
    in fused.c with AVX-512 VNNI: reads the file's 4-bit blocks and its float16 d and m as they are (5 bits
    per weight) and multiplies bytes, where Int4Kernel converts every weight to bf16 first. The layout
    (``_layout``) puts 16 output rows in the 16 int32 lanes of a vector; see fused.c's q4_matmul. As in
    W8A8Kernel, a few outlier input channels are multiplied in float (with the blocks' own values): in
    a block of 32 they would leave the other 31 activations a few int8 levels (+3% perplexity on SmolLM2
    without them).

    packed [N/16, K/32, 4, 16, 4] uint8; scales [N/16, K/32, 2, 16] float16: d, then m. ``pack`` takes
    q [N, K] in 0..15 and d, m [N, K/32].
    """

    @classmethod
    def _layout(cls, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor, tiles: int, blocks: int) -> _Packed:
        # value 8c + 4h + j of a block: chunk c, nibble h (0 low, 1 high), byte j
        lanes = q.to(torch.uint8).reshape(tiles, 16, blocks, 4, 2, 4).permute(0, 2, 3, 4, 1, 5)
        packed = (lanes[:, :, :, 0] | (lanes[:, :, :, 1] << 4)).contiguous()  # [tiles, blocks, 4, 16, 4]
        d16, m16 = d.to(torch.float16), m.to(torch.float16)
        per_lane = [t.reshape(tiles, 16, blocks).permute(0, 2, 1) for t in (d16, m16)]  # [tiles, blocks, 16]
        scales = torch.stack(per_lane, dim=2).contiguous()  # [tiles, blocks, 2, 16]
        return packed, scales, d16.float(), m16.float()

    @classmethod
    def quantize(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        outliers: torch.Tensor,
        fused: FusedKernels,
        dtype: torch.dtype = torch.bfloat16,
        out_dtype: torch.dtype = torch.bfloat16,
    ) -> Q4Kernel:
        """Min/max Q4_1 blocks for weights that arrive as floats (what llama.cpp's quantizer makes)."""
        n, k = weight.shape
        groups = weight.float().reshape(n, k // GROUP, GROUP)
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)
        d = ((high - low) / 15.0).half().float().clamp_(min=1e-8)
        m = low.half().float()
        q = torch.round((groups - m[..., None]) / d[..., None]).clamp_(0, 15).reshape(n, k)
        return cls.pack(q, d, m, bias, outliers, fused, dtype, out_dtype)

    def _channel(self, block: int, within: int) -> torch.Tensor:
        chunk, nibble, byte = within // 8, (within % 8) // 4, within % 4
        q = ((self.packed[:, block, chunk, :, byte] >> (4 * nibble)) & 0x0F).float()  # [tiles, 16]
        d, m = self.scales[:, block, 0, :].float(), self.scales[:, block, 1, :].float()
        return q * d + m

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fused.q4_matmul(x, self, self.out_dtype)
        return y if self.bias is None else y.add_(self.bias.to(y.dtype))


@dataclass
class Q8Kernel(_BlockKernel):
    """GGUF blocks of 5 to 8 bits (Q8_0, Q6_K, Q5_K, and Q5_0 / Q5_1 converted exactly) as byte codes with
    d and m per 16 weights (w = d * u + m, gguf_formats.Blocks), times activations quantized to int8 per
    block of 32, in fused.c (AVX-512 VNNI). Reads one byte per weight plus its scales: float16 where that
    holds the file's values exactly (Q8_0, Q5_0, Q5_1: 9 bits a weight), float32 otherwise (Q6_K, Q5_K:
    10 bits). Layout: see fused.c's q8_matmul.

    packed [N/16, K/32, 8, 16, 4] uint8; scales [N/16, K/32, 4, 16] float16 or float32: d, m of weights
    0-15, then of 16-31. ``pack`` takes q [N, K] uint8 codes and d, m [N, K/16] float32.
    """

    format: str = "q8"

    SCALE_GROUP = GROUP // 2

    @classmethod
    def _layout(cls, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor, tiles: int, blocks: int) -> _Packed:
        # weight 4s + j of a block: group s, byte j
        packed = q.to(torch.uint8).reshape(tiles, 16, blocks, 8, 4).permute(0, 2, 3, 1, 4).contiguous()
        halves = [t.reshape(tiles, 16, blocks, 2).permute(0, 2, 3, 1) for t in (d, m)]  # [tiles, blocks, 2, 16]
        scales = torch.stack([halves[0][:, :, 0], halves[1][:, :, 0], halves[0][:, :, 1], halves[1][:, :, 1]], dim=2)
        scales = scales.to(torch.float32).contiguous()
        as_f16 = scales.to(torch.float16)
        if torch.equal(as_f16.to(torch.float32), scales):  # exact in float16: half the bytes
            scales = as_f16.contiguous()
        return packed, scales, d, m

    def _channel(self, block: int, within: int) -> torch.Tensor:
        u = self.packed[:, block, within // 4, :, within % 4].float()  # [tiles, 16]
        half = 2 * (within // 16)
        d, m = self.scales[:, block, half, :].float(), self.scales[:, block, half + 1, :].float()
        return u * d + m

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fused.q8_matmul(x, self, self.out_dtype)
        return y if self.bias is None else y.add_(self.bias.to(y.dtype))


@dataclass
class Linear:
    """One logical layer: kernels tried in order, the first whose ``max_rows`` admits the batch serves it."""

    kernels: list[tuple[float, Kernel]]  # (max_rows, kernel); the last entry's max_rows is unbounded (inf)
    out_dtype: torch.dtype
    in_features: int = field(default=0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # x [N, K] -> [N, out]
        kernel = self.kernel_for(x.shape[0])
        # Compared before converting: even a no-op .to() costs a microsecond, ~120 times per step.
        y = kernel(x if x.dtype == kernel.dtype else x.to(kernel.dtype))
        return y if y.dtype == self.out_dtype else y.to(self.out_dtype)

    def kernel_for(self, rows: int) -> Kernel:
        for max_rows, kernel in self.kernels:
            if rows <= max_rows:
                return kernel
        return self.kernels[-1][1]

    def nbytes(self) -> int:
        return sum(kernel.nbytes() for _, kernel in self.kernels)


def int4_supported(in_features: int, device: torch.device) -> bool:
    return device.type == "cpu" and in_features % GROUP == 0 and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def int8_supported(device: torch.device) -> bool:
    return device.type == "cpu"


def w8a8_supported(device: torch.device) -> bool:
    return device.type == "cpu" and hasattr(torch, "_int_mm")


def q4_1_to_int4(blocks: torch.Tensor, out_features: int, in_features: int) -> tuple[torch.Tensor, ...]:
    """Raw GGUF Q4_1 bytes [out, K/32 * 20] -> q [out, K] (0..15), scale, zero [out, K/32] (float32).

    A block is d (f16), m (f16), then 16 bytes: low nibbles are the block's first 16 values, high
    nibbles the last 16; value = d * q + m.
    """
    groups = in_features // GROUP
    raw = blocks.reshape(out_features, groups, 20)
    d = raw[..., 0:2].contiguous().view(torch.float16).squeeze(-1).float()  # [out, groups]
    m = raw[..., 2:4].contiguous().view(torch.float16).squeeze(-1).float()
    nibbles = raw[..., 4:20].to(torch.int32)  # [out, groups, 16]
    q = torch.cat([nibbles & 0xF, nibbles >> 4], dim=-1).reshape(out_features, in_features)
    return q, d, m + 8 * d


def _outlier_channels(outliers: torch.Tensor, width: int) -> torch.Tensor:
    """Outlier input channels as fused.c reads them ([k] int64, contiguous), checked once per layer here
    (fused.c checks them again at every call): each a channel of the input, none negative (PyTorch's
    indexing would wrap a negative one, fused.c refuses it)."""
    channels = outliers.to(torch.long).contiguous()
    if channels.dim() != 1 or (channels.numel() and (int(channels.min()) < 0 or int(channels.max()) >= width)):
        raise ValueError(f"outlier channels {channels.tolist()} must be a list of input channels 0..{width - 1}")
    return channels


def fuse_rows(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack the output rows of several layers fed by the same input into one weight."""
    return torch.cat(list(parts), dim=0)


def _can_pack(dtype: torch.dtype) -> bool:
    # torch leaves mkldnn.is_available() unannotated (it returns torch._C._has_mkldnn, a bool).
    available: bool = torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]
    return available and dtype in (torch.float32, torch.bfloat16)


def _as(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def _nbytes(*tensors: torch.Tensor | None) -> int:
    # oneDNN-packed weights are opaque (no storage to ask); their size is their element count's.
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)
