"""The kernels of ``fused.c``: built with the system C compiler by the set-up command (``make setup`` runs
``python -m textgen.engine.core.build``; a server that finds no build makes one on first use), loaded with
ctypes. Their signatures, limits and status codes come from ``fused.h`` (``fused_header.py``). They
serve the Llama model step in bfloat16 on a CPU (``llama.step_fused``: decode rows and prompts alike),
the Q4_1 and w8a8 products (``linear.Q4Kernel``, ``linear.W8A8Kernel``) and top-p sampling
(``sampling.nucleus_by_rejection``).

Why C and ctypes rather than a PyTorch extension: the file is plain loops plus a few AVX-512
intrinsics, compiles in about a second with no PyTorch headers, and a ctypes call costs about what one
PyTorch operator does while replacing six to twenty of them. The library is built once per source, CPU
and compiler, into a folder only the service's user can write (``kernel_folder``, ``open_private_folder``);
without a compiler, or when that folder or the library in it is not ours alone, the core runs its PyTorch
path and says why (a WARNING, ``/ready``'s details), and without AVX-512 VNNI int4 uses PyTorch's kernel.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import logging
import os
import platform
import secrets
import shutil
import stat
import subprocess
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from textgen.engine.core.fused_header import HEADER as HEADER_PATH
from textgen.engine.core.fused_header import read_header

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("fused.c")
# Signatures, limits and status codes: fused.h, read once here (fused_header.py), never written again.
HEADER = read_header(HEADER_PATH)
MAX_WIDTH, MAX_HEADS, MAX_DIM, MAX_LIVE, MAX_GROUP, MAX_VOCAB = (
    HEADER.constant(name) for name in ("MAX_WIDTH", "MAX_HEADS", "MAX_DIM", "MAX_LIVE", "MAX_GROUP", "MAX_VOCAB")
)
# Compiled with -ffast-math so gcc vectorises the reductions and expf (glibc's vector math, libmvec; fused.c
# uses no inf or NaN), then linked *without* it: linking a -ffast-math library pulls in crtfastmath.o, which
# sets flush-to-zero for the whole process when the library loads (hypothesis's float strategies noticed).
# -fopenmp runs the row loops on PyTorch's own OpenMP threads (see fused.c). Each later set drops what a
# machine may lack: libmvec (scalar expf), then OpenMP (single-threaded). --no-undefined makes a missing
# symbol fail the build rather than the load.
COMPILE_FLAG_SETS = (
    ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC"],
    ["-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-fPIC"],
    ["-O3", "-march=native", "-fno-math-errno", "-fPIC"],
)
LINK_FLAG_SETS = (
    ["-shared", "-fopenmp", "-Wl,--no-undefined", "-lmvec", "-lm"],
    ["-shared", "-fopenmp", "-Wl,--no-undefined", "-lm"],
    ["-shared", "-Wl,--no-undefined", "-lm"],
)


@dataclass(frozen=True)
class Variant:
    """A build of fused.c: the service's own (``native``), or one for the tests (``scalar``, ``sanitize``)."""

    name: str
    compile_flags: tuple[str, ...] = ()  # added to each of COMPILE_FLAG_SETS
    link_flags: tuple[str, ...] = ()  # added to each of LINK_FLAG_SETS

    def library_name(self, key: str) -> str:
        return f"fused-{key}.so" if self.name == "native" else f"fused-{self.name}-{key}.so"


NATIVE = Variant("native")
# -mno-avx512f after -march=native also turns off every AVX-512 extension (BF16, VNNI, BW): the plain C loops
# run, as on a CPU without AVX-512, and q4_supported() is 0.
SCALAR = Variant("scalar", ("-mno-avx512f",))
# AddressSanitizer and UndefinedBehaviorSanitizer, stopping at the first report (-fno-sanitize-recover). Only
# loadable with libasan preloaded (LD_PRELOAD): tests/unit/test_fused_sanitized.py runs it in a subprocess.
# -O1 (after the sets' -O3, so it wins): the tests compile it afresh on every run, and instrumented -O3 costs
# ~4x the compiler time (18 s of CPU against 5 s) for kernels that then run on tiny shapes; the sanitizers
# check every access at any level, and -march=native keeps the AVX-512 paths in.
SANITIZE = Variant(
    "sanitize",
    ("-O1", "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"),
    ("-fsanitize=address,undefined",),
)
VARIANTS = {variant.name: variant for variant in (NATIVE, SCALAR, SANITIZE)}

_STATUS = {
    HEADER.constant("FUSED_BAD_SHAPE"): "a shape beyond the limits of fused.h, or inconsistent",
    HEADER.constant("FUSED_BAD_INDEX"): "a position, cache row or outlier index outside its tensor",
    HEADER.constant("FUSED_NO_MEMORY"): "no memory for its scratch buffers",
    HEADER.constant("FUSED_UNSUPPORTED"): "not in this build (it needs AVX-512 VNNI)",
}
_FUSED_OK = HEADER.constant("FUSED_OK")


class FusedArgumentError(ValueError):
    """A tensor or size handed to a fused kernel that it cannot take (refused before any C runs), or a status
    from one of fused.c's own guards."""


class W8A8Weights(Protocol):
    """A w8a8 layer's constants (``linear.W8A8Kernel``): what quantizes its input and rescales its output."""

    scales: torch.Tensor  # [out] float32
    outliers: torch.Tensor  # [k] long
    outlier_weight_t: torch.Tensor  # [k, out] float32
    bias: torch.Tensor | None


@dataclass(frozen=True)
class Quantized:
    """Rows quantized for a w8a8 product: q [N, K] int8 (outlier channels zero), row_max [N, 1] float32,
    outlying [N, k] float32 (the outlier channels' values)."""

    q: torch.Tensor
    row_max: torch.Tensor
    outlying: torch.Tensor

    @classmethod
    def empty(cls, rows: int, width: int, outliers: int) -> Quantized:
        return cls(torch.empty(rows, width, dtype=torch.int8), torch.empty(rows, 1), torch.empty(rows, outliers))


def step_fits(embed: torch.Tensor, heads: int, kv_heads: int, head_dim: int, mlp_width: int, batch: int,
              live: int) -> bool:
    """What every family's fused model step (llama.step_fused, gemma3.step_fused) needs of fused.c: a batch,
    bf16 embeddings on a CPU, and heads, widths (the residual stream's and the MLP's) and live positions
    within fused.h's limits."""
    return (
        batch > 0
        and embed.dtype == torch.bfloat16
        and embed.device.type == "cpu"
        and live <= MAX_LIVE
        and heads <= MAX_HEADS
        and heads // kv_heads <= MAX_GROUP
        and head_dim <= MAX_DIM
        and embed.shape[1] <= MAX_WIDTH
        and mlp_width <= MAX_WIDTH
    )


# ----- the boundary: every tensor checked before its address goes to C -----------------------------------
# fused.c reads raw addresses: a tensor of the wrong dtype, layout, device or shape would be read past its
# end or misread without a word. What Python can see (metadata) is checked here, on every call; what it
# cannot see without reading the tensors (positions, cache rows, outlier indices) fused.c checks itself.

Dim = int | None  # a required size, or None for any


def _expect(tensor: torch.Tensor, name: str, dtypes: tuple[torch.dtype, ...], shape: tuple[Dim, ...]) -> None:
    """tensor has one of dtypes, lives in CPU memory, is contiguous and has this shape (None: any size);
    FusedArgumentError naming what is wrong otherwise. The first line is the whole check for a good tensor
    of a fully known shape (under a microsecond); the rest explains a refusal, or matches None sizes."""
    if tensor.dtype in dtypes and tensor.is_cpu and tensor.shape == shape and tensor.is_contiguous():
        return
    if tensor.device.type != "cpu":
        raise FusedArgumentError(f"{name} is on {tensor.device}: the fused kernels read CPU memory only")
    if tensor.dtype not in dtypes:
        raise FusedArgumentError(f"{name} is {tensor.dtype}, expected {' or '.join(map(str, dtypes))}")
    if tensor.dim() != len(shape) or any(want is not None and got != want for got, want in zip(
        tensor.shape, shape, strict=True
    )):
        wanted = ", ".join("*" if size is None else str(size) for size in shape)
        raise FusedArgumentError(f"{name} has shape {tuple(tensor.shape)}, expected ({wanted})")
    if not tensor.is_contiguous():
        raise FusedArgumentError(f"{name} is not contiguous (fused.c reads rows at fixed strides)")


def _expect_rows(tensor: torch.Tensor, name: str, dtypes: tuple[torch.dtype, ...], dims: int) -> torch.Size:
    """A call's leading tensor, whose sizes set the others': checked for dtype, CPU, layout and its number
    of dimensions; its shape."""
    if tensor.dtype in dtypes and tensor.is_cpu and tensor.dim() == dims and tensor.is_contiguous():
        return tensor.shape
    _expect(tensor, name, dtypes, (None,) * dims)
    return tensor.shape


# A layer's constants (weights, scales, outlier channels, rotary tables, the KV cache) come back at every
# call of a model step: each is checked in full the first time it is seen with a given expectation, and
# after that recognised (its identity, through a weak reference so a freed tensor's id reused by another is
# not mistaken for it). Nothing in this package changes a tensor's dtype, shape or layout in place.
_CONSTANTS: dict[int, tuple[weakref.ref[torch.Tensor], tuple[object, ...]]] = {}
_CONSTANTS_LIMIT = 65536  # forgotten all at once past this (stale entries of freed tensors pile up otherwise)


def _expect_constant(tensor: torch.Tensor, name: str, dtypes: tuple[torch.dtype, ...], shape: tuple[Dim, ...]) -> None:
    """_expect for a tensor that is a layer's constant: in full once per tensor and expectation."""
    key = (dtypes, shape)
    seen = _CONSTANTS.get(id(tensor))
    if seen is not None and seen[1] == key and seen[0]() is tensor:
        return
    _expect(tensor, name, dtypes, shape)
    if len(_CONSTANTS) >= _CONSTANTS_LIMIT:
        _CONSTANTS.clear()
    _CONSTANTS[id(tensor)] = (weakref.ref(tensor), key)


INT8_ROWS = 4  # int8_matmul's most rows (fused.c): beyond a few rows _int_mm's blocked product is faster
_BF16, _F32, _I64, _I32 = (torch.bfloat16,), (torch.float32,), (torch.int64,), (torch.int32,)
_ROWS_DTYPES = (torch.bfloat16, torch.float32)  # what the w8a8 and Q4 helpers read and write


def _expect_weights(weights: W8A8Weights, name: str, out: int) -> int:
    """A w8a8 layer with `out` outputs; its number of outlier channels."""
    count = weights.outliers.numel()
    _expect_constant(weights.outliers, f"{name}.outliers", _I64, (count,))
    _expect_constant(weights.scales, f"{name}.scales", _F32, (out,))
    _expect_constant(weights.outlier_weight_t, f"{name}.outlier_weight_t", _F32, (count, out))
    if weights.bias is not None:
        _expect_constant(weights.bias, f"{name}.bias", _F32, (out,))
    return count


def _expect_quantized(source: Quantized, rows: int, width: int | None, count: int | None) -> None:
    if width is not None:
        _expect(source.q, "quantized.q", (torch.int8,), (rows, width))
    _expect(source.row_max, "quantized.row_max", _F32, (rows, 1))
    _expect(source.outlying, "quantized.outlying", _F32, (rows, count))


def _product_args(acc: torch.Tensor | None, source: Quantized | None, weights: W8A8Weights | None) -> list[object]:
    """fused.c's seven arguments for an int32 product to rescale (all NULL when there is none)."""
    if acc is None or source is None or weights is None:
        return [None] * 5 + [0, None]
    return [
        acc.data_ptr(), source.row_max.data_ptr(), weights.scales.data_ptr(), source.outlying.data_ptr(),
        weights.outlier_weight_t.data_ptr(), source.outlying.shape[1],
        None if weights.bias is None else weights.bias.data_ptr(),
    ]


def _expect_product(acc: torch.Tensor, source: Quantized, weights: W8A8Weights, rows: int, out: int) -> None:
    """An int32 product [rows, out] of rows quantized as source, through the w8a8 layer weights."""
    _expect(acc, "acc", _I32, (rows, out))
    _expect_quantized(source, rows, None, _expect_weights(weights, "product", out))


class BlockWeights(Protocol):
    """A block layer's constants (``linear.Q4Kernel``, ``linear.Q8Kernel``), as q4_matmul / q8_matmul read them."""

    packed: torch.Tensor  # [N/16, K/32, chunks, 16, 4] uint8
    scales: torch.Tensor  # [N/16, K/32, rows, 16]: the blocks' d and m
    outliers: torch.Tensor  # [k] long
    outlier_weight_t: torch.Tensor  # [k, N] float32


@dataclass(frozen=True)
class _BlockLayout:
    """What differs between fused.c's two block products (see linear.Q4Kernel and linear.Q8Kernel.pack)."""

    function: str  # the C function
    what: str  # the weight, in errors
    chunks: int  # packed [N/16, K/32, chunks, 16, 4]
    scale_rows: int  # scales [N/16, K/32, scale_rows, 16]
    scale_dtypes: tuple[torch.dtype, ...]
    scale_flag: bool  # the C function takes "scales are float32" after scales
    group: int  # activations quantized per group of this many


_Q4_LAYOUT = _BlockLayout("q4_matmul", "Q4 weight", 4, 2, (torch.float16,), False, 32)
_Q8_LAYOUT = _BlockLayout("q8_matmul", "Q8 block weight", 8, 4, (torch.float16, torch.float32), True, 16)


@dataclass(frozen=True)
class FusedKernels:
    library: ctypes.CDLL
    build_key: str = ""  # source, flags, compiler and CPU the library was built for

    def __post_init__(self) -> None:
        for signature in HEADER.functions.values():  # fused.h's declarations, every one
            function = getattr(self.library, signature.name)  # AttributeError: a library without it
            function.argtypes = signature.argtypes
            function.restype = signature.restype

    def add_rms_norm(
        self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, out: torch.Tensor, eps: float
    ) -> None:
        """x [N, E] += delta (in place, when given); out [N, E] = rms_norm(x) * weight [E]."""
        rows, width = _expect_rows(x, "x", _BF16, 2)
        if delta is not None:
            _expect(delta, "delta", _BF16, (rows, width))
        _expect_constant(weight, "weight", _BF16, (width,))
        _expect(out, "out", _BF16, (rows, width))
        status = self.library.add_rms_norm(
            x.data_ptr(), None if delta is None else delta.data_ptr(), weight.data_ptr(), out.data_ptr(),
            rows, width, eps,
        )
        _check(status, "add_rms_norm")

    def rotary_cache_attention(
        self,
        qkv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        positions: torch.Tensor,
        cache_rows: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        out: torch.Tensor,
        heads: int,
        scale: float,
        tables: torch.Tensor | None = None,
        *,
        window: int = 0,
        q_norm: torch.Tensor | None = None,
        k_norm: torch.Tensor | None = None,
        norm_eps: float = 1e-6,
    ) -> None:
        """qkv [B, (Hq + 2 Hkv) D]; writes the rotated key and the value at each row's position in keys,
        values and the attention output over positions 0..position to out [B, Hq D].

        Paged (``tables`` [R, W] int64 block ids): keys, values [blocks, Hkv, block size, D], and token b's
        position p is in block tables[cache_rows[b], p // block size]. Without tables the cache is one block
        per row: keys, values [S, Hkv, T, D] and cache_rows index its rows.
        window > 0: over the last ``window`` positions only (sliding-window layers). q_norm, k_norm [D]:
        each query / key head RMS-normalised with that weight before its rotation (Gemma 3, Qwen3)."""
        _expect_constant(keys, "keys", _BF16, (None, None, None, None))
        blocks, kv_heads, block_size, dim = keys.shape
        if heads <= 0 or kv_heads <= 0 or heads % kv_heads:
            raise FusedArgumentError(f"{heads} query heads over {kv_heads} KV heads: both must be > 0, and the "
                                     "query heads a multiple of the KV heads")
        _expect_constant(values, "values", _BF16, (blocks, kv_heads, block_size, dim))
        rows = _expect_rows(qkv, "qkv", _BF16, 2)[0]
        _expect(qkv, "qkv", _BF16, (rows, (heads + 2 * kv_heads) * dim))
        _expect_constant(cos, "cos", _BF16, (None, dim))
        _expect_constant(sin, "sin", _BF16, (cos.shape[0], dim))
        _expect(positions, "positions", _I64, (rows,))
        _expect(cache_rows, "cache_rows", _I64, (rows,))
        _expect(out, "out", _BF16, (rows, heads * dim))
        if window < 0:
            raise FusedArgumentError(f"window {window}: 0 (every cached position) or the positions attended")
        for norm, name in ((q_norm, "q_norm"), (k_norm, "k_norm")):
            if norm is not None:
                _expect_constant(norm, name, _BF16, (dim,))
        if tables is None:
            tables = torch.arange(blocks, dtype=torch.long)[:, None]
        _expect_rows(tables, "tables", _I64, 2)  # any size: the fast path (called once per layer and step)
        if tables.shape[0] < 1 or tables.shape[1] < 1:
            raise FusedArgumentError(f"tables has shape {tuple(tables.shape)}; it needs at least one row and column")
        status = self.library.rotary_cache_attention(
            qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), cos.shape[0], positions.data_ptr(),
            cache_rows.data_ptr(), tables.data_ptr(), keys.data_ptr(), values.data_ptr(), out.data_ptr(), rows, heads,
            kv_heads, dim, blocks, block_size, tables.shape[0], tables.shape[1], scale,
            None if q_norm is None else q_norm.data_ptr(), None if k_norm is None else k_norm.data_ptr(), norm_eps,
            window,
        )
        _check(status, "rotary_cache_attention")

    def silu_mul(self, gate_up: torch.Tensor, out: torch.Tensor) -> None:
        """gate_up [N, 2F] -> out [N, F] = silu(gate) * up."""
        rows, features = _expect_rows(out, "out", _BF16, 2)
        _expect(gate_up, "gate_up", _BF16, (rows, 2 * features))
        self.library.silu_mul(gate_up.data_ptr(), out.data_ptr(), rows, features)

    def gelu_tanh_mul(self, gate_up: torch.Tensor, out: torch.Tensor) -> None:
        """gate_up [N, 2F] -> out [N, F] = gelu_tanh(gate) * up."""
        rows, features = _expect_rows(out, "out", _BF16, 2)
        _expect(gate_up, "gate_up", _BF16, (rows, 2 * features))
        self.library.gelu_tanh_mul(gate_up.data_ptr(), out.data_ptr(), rows, features)

    def quantize_rows(self, x: torch.Tensor, outliers: torch.Tensor) -> Quantized:
        """x [N, K] bf16 or float32 -> its rows quantized for a w8a8 product (see W8A8Kernel)."""
        rows, width = _expect_rows(x, "x", _ROWS_DTYPES, 2)
        _expect_constant(outliers, "outliers", _I64, (None,))
        out = Quantized.empty(rows, width, outliers.numel())
        status = self.library.quantize_rows(
            x.data_ptr(), x.dtype == torch.bfloat16, outliers.data_ptr(), outliers.numel(), out.q.data_ptr(),
            out.row_max.data_ptr(), out.outlying.data_ptr(), rows, width,
        )
        _check(status, "quantize_rows")
        return out

    def residual_norm_quantize(
        self,
        x: torch.Tensor,
        product: tuple[torch.Tensor, Quantized, W8A8Weights] | None,
        norm_weight: torch.Tensor,
        eps: float,
        target: W8A8Weights | None,
        out: torch.Tensor | None = None,
    ) -> Quantized | None:
        """x [N, E] bf16 += product (an int32 result, the input it came from, its layer), in place; then
        rms_norm(x) * norm_weight quantized for the target layer, or (target None) written to out [N, E]."""
        rows, width = _expect_rows(x, "x", _BF16, 2)
        acc, source, weights = product if product is not None else (None, None, None)
        if acc is not None and source is not None and weights is not None:
            _expect_product(acc, source, weights, rows, width)
        _expect_constant(norm_weight, "norm_weight", _BF16, (width,))
        if target is None and out is None:
            raise FusedArgumentError("residual_norm_quantize needs a target layer or an out tensor")
        if out is not None:
            _expect(out, "out", _BF16, (rows, width))
        if target is not None:
            _expect_constant(target.outliers, "target.outliers", _I64, (None,))
        quantized = None if target is None else Quantized.empty(rows, width, target.outliers.numel())
        status = self.library.residual_norm_quantize(
            x.data_ptr(), *_product_args(acc, source, weights), norm_weight.data_ptr(), eps,
            *_target_args(target, quantized), None if out is None else out.data_ptr(), rows, width,
        )
        _check(status, "residual_norm_quantize")
        return quantized

    def silu_quantize(
        self, acc: torch.Tensor, source: Quantized, weights: W8A8Weights, target: W8A8Weights
    ) -> Quantized:
        """acc [N, 2F] int32 (gate then up, from source through weights) -> silu(gate) * up quantized for
        the target layer."""
        rows, columns = _expect_rows(acc, "acc", _I32, 2)
        features = columns // 2
        if columns % 2:
            raise FusedArgumentError(f"acc has {acc.shape[1]} columns: gate and up need an even number")
        _expect_product(acc, source, weights, rows, 2 * features)
        _expect_constant(target.outliers, "target.outliers", _I64, (None,))
        quantized = Quantized.empty(rows, features, target.outliers.numel())
        status = self.library.silu_quantize(
            *_product_args(acc, source, weights), *_target_args(target, quantized), rows, features
        )
        _check(status, "silu_quantize")
        return quantized

    def dequantize_rows(
        self,
        acc: torch.Tensor,
        row_max: torch.Tensor,
        col_scale: torch.Tensor,
        outlying: torch.Tensor,
        outlier_weight_t: torch.Tensor,
        bias: torch.Tensor | None,
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        """acc [N, out] int32 -> acc * row_max * col_scale + outlying @ outlier_weight_t + bias, in out_dtype."""
        rows, cols = _expect_rows(acc, "acc", _I32, 2)
        _expect(row_max, "row_max", _F32, (rows, 1))
        _expect_constant(col_scale, "col_scale", _F32, (cols,))
        _expect_constant(outlier_weight_t, "outlier_weight_t", _F32, (None, cols))
        _expect(outlying, "outlying", _F32, (rows, outlier_weight_t.shape[0]))
        if bias is not None:
            _expect_constant(bias, "bias", _F32, (cols,))
        if out_dtype not in _ROWS_DTYPES:
            raise FusedArgumentError(f"out_dtype {out_dtype}: fused.c writes bfloat16 or float32")
        out = torch.empty(rows, cols, dtype=out_dtype)
        self.library.dequantize_rows(
            acc.data_ptr(), row_max.data_ptr(), col_scale.data_ptr(), outlying.data_ptr(),
            outlier_weight_t.data_ptr(), outlying.shape[1], None if bias is None else bias.data_ptr(),
            out.data_ptr(), out_dtype == torch.bfloat16, rows, cols,
        )
        return out

    def int8_matmul(self, q: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
        """q [N, K] int8 times weight_t [K, out] int8, the transpose of a contiguous [out, K] matrix (how
        W8A8Kernel holds it) -> [N, out] int32, exactly torch._int_mm's result; for N <= INT8_ROWS (AVX-512
        VNNI builds only: see q4_supported)."""
        rows, k = _expect_rows(q, "q", (torch.int8,), 2)
        if rows > INT8_ROWS:
            raise FusedArgumentError(f"int8_matmul takes at most {INT8_ROWS} rows, not {rows}")
        weight = weight_t.t()  # a new view each call: checked in full every time (a few tenths of a us)
        _expect(weight, "weight_t.t()", (torch.int8,), (weight_t.shape[1], k))
        acc = torch.empty(rows, weight.shape[0], dtype=torch.int32)
        status = self.library.int8_matmul(q.data_ptr(), weight.data_ptr(), acc.data_ptr(), rows, weight.shape[0], k)
        _check(status, "int8_matmul")
        return acc

    @property
    def q4_supported(self) -> bool:
        """Whether this build has the Q4_1 x int8 product (AVX-512 VNNI on this CPU)."""
        return bool(self.library.q4_supported())

    def q4_matmul(self, x: torch.Tensor, weight: BlockWeights, out_dtype: torch.dtype) -> torch.Tensor:
        """x [N, K] bf16 or float32 times a weight packed by linear.Q4Kernel -> [N, out] in out_dtype; the
        outlier channels [k] of x are multiplied in float with outlier_weight_t [k, out]."""
        return self._block_matmul(_Q4_LAYOUT, x, weight, out_dtype)

    def q8_matmul(self, x: torch.Tensor, weight: BlockWeights, out_dtype: torch.dtype) -> torch.Tensor:
        """x [N, K] bf16 or float32 times a weight packed by linear.Q8Kernel (8-bit codes, d and m per 16
        weights in float16 or float32) -> [N, out] in out_dtype; outliers as in q4_matmul."""
        return self._block_matmul(_Q8_LAYOUT, x, weight, out_dtype)

    def _block_matmul(
        self, layout: _BlockLayout, x: torch.Tensor, weight: BlockWeights, out_dtype: torch.dtype
    ) -> torch.Tensor:
        """q4_matmul and q8_matmul: the same checks, each product's own layout and C function."""
        packed, scales, outliers, outlier_weight_t = (
            weight.packed, weight.scales, weight.outliers, weight.outlier_weight_t
        )
        x = x.contiguous()
        rows, k = _expect_rows(x, "x", _ROWS_DTYPES, 2)
        _expect_constant(outliers, "outliers", _I64, (None,))
        _expect_constant(outlier_weight_t, "outlier_weight_t", _F32, (outliers.numel(), None))
        out_features = outlier_weight_t.shape[1]
        if k % 32 or out_features % 16:
            raise FusedArgumentError(
                f"a {layout.what} [{out_features}, {k}]: outputs a multiple of 16, inputs of 32"
            )
        tiles, blocks = out_features // 16, k // 32
        _expect_constant(packed, "packed", (torch.uint8,), (tiles, blocks, layout.chunks, 16, 4))
        _expect_constant(scales, "scales", layout.scale_dtypes, (tiles, blocks, layout.scale_rows, 16))
        if out_dtype not in _ROWS_DTYPES:
            raise FusedArgumentError(f"out_dtype {out_dtype}: fused.c writes bfloat16 or float32")
        out = torch.empty(rows, out_features, dtype=out_dtype)
        # The quantized activations are fused.c's own scratch (malloc'd and freed inside the call): two tensors
        # and four ctypes arguments fewer, ~3 us of a ~14 us call at batch 1.
        scale_flag = [scales.dtype == torch.float32] if layout.scale_flag else []
        function = getattr(self.library, layout.function)
        status = function(
            x.data_ptr(), x.dtype == torch.bfloat16, packed.data_ptr(), scales.data_ptr(), *scale_flag,
            outliers.data_ptr(), outliers.numel(), outlier_weight_t.data_ptr(), out.data_ptr(),
            out_dtype == torch.bfloat16, rows, out_features, k,
        )
        _check(status, layout.function)
        return out

    def sample_nucleus(
        self, logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, uniforms: torch.Tensor
    ) -> torch.Tensor:
        """Top-p by rejection (sampling.nucleus_by_rejection) for logits [B, V] float32 on the CPU;
        temperature, top_p [B] float32; uniforms [B, draws]. -> token ids [B], -1 where every draw was
        rejected."""
        logits, uniforms = logits.contiguous(), uniforms.contiguous()
        temperature, top_p = temperature.contiguous(), top_p.contiguous()
        rows, vocab = _expect_rows(logits, "logits", _F32, 2)
        _expect(temperature, "temperature", _F32, (rows,))
        _expect(top_p, "top_p", _F32, (rows,))
        _expect(uniforms, "uniforms", _F32, (rows, None))
        chosen = torch.empty(rows, dtype=torch.long)
        status = self.library.sample_nucleus(
            logits.data_ptr(), temperature.data_ptr(), top_p.data_ptr(), uniforms.data_ptr(), chosen.data_ptr(),
            rows, vocab, uniforms.shape[1],
        )
        _check(status, "sample_nucleus")
        return chosen


def _target_args(target: W8A8Weights | None, quantized: Quantized | None) -> list[object]:
    """fused.c's five arguments for rows to quantize for the target layer (NULL and 0 when there is none)."""
    if target is None or quantized is None:
        return [None, 0, None, None, None]
    return [
        target.outliers.data_ptr(), target.outliers.numel(), quantized.q.data_ptr(), quantized.row_max.data_ptr(),
        quantized.outlying.data_ptr(),
    ]


def _check(status: int, name: str) -> None:
    if status != _FUSED_OK:
        reason = _STATUS.get(status, f"unknown status {status}")
        raise FusedArgumentError(f"fused {name} refused its arguments: {reason}")


class KernelFolderRefused(Exception):
    """The kernel folder or the library in it is not ours alone (owner, mode, symlink): never loaded."""


@dataclass(frozen=True)
class KernelBuild:
    """What ``build_fused_kernels`` found: the loaded library, or why there is none and how to fix it."""

    kernels: FusedKernels | None
    problem: str = ""  # empty when kernels is set


def load_fused_kernels(folder: Path | None = None) -> FusedKernels | None:
    """The compiled library, or None where it cannot be built or may not be loaded (see build_fused_kernels)."""
    return build_fused_kernels(folder).kernels


def build_fused_kernels(
    folder: Path | None = None, variant: Variant = NATIVE, *, at_setup: bool = False
) -> KernelBuild:
    """Load the library from a folder only this user can write, building it there first if it is missing.

    The set-up command builds it (``python -m textgen.engine.core.build``, run by ``make setup``; ``at_setup``),
    once per source, header, CPU and compiler: the server then only loads it. A server that finds none
    (a new source, CPU or compiler since set-up) builds it on first use and says so once (a WARNING).

    It is a build of this package's source for this machine, not model data, so by default it lives in
    the user's cache (``kernel_folder``), whatever TEXTGEN_CACHE_DIR says: every server, worker and test
    of this user shares one build. Loaded once per process and folder (the core and the engine's sampler
    ask for the same library), so a problem is logged once, as a WARNING naming the reason and the fix;
    the caller runs PyTorch's operators instead and reports ``problem`` (``/ready``, the bench header).
    """
    return _load(folder if folder is not None else kernel_folder(), find_compiler(), variant, at_setup)


def find_compiler() -> str | None:
    """$CC, else cc, else gcc on the PATH; None when there is none."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def kernel_folder() -> Path:
    """``$XDG_CACHE_HOME/textgen/kernels``, else ``~/.cache/textgen/kernels``: under the service user's own
    home, never a shared temporary folder (where another local user could create the folder first)."""
    cache = os.environ.get("XDG_CACHE_HOME")
    base = Path(cache) if cache and Path(cache).is_absolute() else Path.home() / ".cache"
    return base / "textgen" / "kernels"


@functools.cache
def _load(folder: Path, compiler: str | None, variant: Variant, at_setup: bool) -> KernelBuild:
    if compiler is None:
        return _unavailable("no C compiler found", "install gcc, or set CC to a C compiler")
    try:
        directory = open_private_folder(folder)
    except KernelFolderRefused as refused:
        return _unavailable(str(refused), _FOLDER_FIX.format(folder=folder))
    except OSError as error:
        return _unavailable(f"kernel folder {folder}: {error}", _FOLDER_FIX.format(folder=folder))
    try:
        key = _build_key(compiler, variant)
        name = variant.library_name(key)
        if not _entry_exists(directory, name):
            if not at_setup and variant is NATIVE:
                logger.warning("Fused CPU kernels were not built at set-up (make setup, or python -m "
                               "textgen.engine.core.build) for this source, CPU and compiler: compiling %s now",
                               folder / name)
            _compile(compiler, directory, folder, name, variant)
        kernels = FusedKernels(_load_private_library(directory, folder / name), key)
    except KernelFolderRefused as refused:
        return _unavailable(str(refused), f"delete it (rm {folder / name}) so that it is rebuilt")
    except (OSError, subprocess.SubprocessError) as error:
        return _unavailable(f"the build failed ({_first_line(error)})", "check that CC compiles C (gcc)")
    except AttributeError as error:  # a library without a function fused.h declares
        return _unavailable(f"kernel library {folder / name} is incomplete ({error})",
                            f"delete it (rm {folder / name}) so that it is rebuilt")
    finally:
        os.close(directory)
    runtimes = openmp_runtimes()
    if len(runtimes) > 1:
        logger.warning("Fused CPU kernels run single-threaded: a second OpenMP runtime was loaded (%s)", runtimes)
        kernels.library.set_parallel(0)
    return KernelBuild(kernels)


_FOLDER_FIX = (
    "make {folder} a directory owned by this user with no group/other write bits and no symlink on the "
    "way (or delete it to have it recreated), or point XDG_CACHE_HOME at a folder this user owns"
)


def _unavailable(reason: str, fix: str) -> KernelBuild:
    problem = f"{reason}; fix: {fix}"
    logger.warning("Fused CPU kernels off, using PyTorch operators (slower): %s", problem)
    return KernelBuild(None, problem)


def _first_line(error: BaseException) -> str:
    detail = getattr(error, "stderr", None) or str(error)
    return str(detail).strip().splitlines()[0] if str(detail).strip() else type(error).__name__


# ----- the kernel folder: ours alone ---------------------------------------------------------------------
# The library runs as the service's user (root, often), so it may only come from a folder nobody else can
# write. Every component of the path is opened with O_NOFOLLOW relative to its parent (a symlink anywhere
# is refused, not followed), missing ones are created 0700, and the last one must be a directory owned by
# this user without group/other write bits. Everything after that (the compiler's output, the rename, the
# check of the library) goes through the folder's descriptor, and the load through the checked library's
# (/proc/self/fd), so swapping a folder on the way afterwards changes nothing.


def open_private_folder(folder: Path) -> int:
    """An O_DIRECTORY descriptor of ``folder`` (absolute), created 0700 where missing, after checking that it
    is a real directory owned by this user that no one else can write; KernelFolderRefused otherwise."""
    if not folder.is_absolute():
        raise KernelFolderRefused(f"kernel folder {folder} is not an absolute path")
    if not hasattr(os, "geteuid") or not hasattr(os, "O_NOFOLLOW") or os.open not in os.supports_dir_fd:
        raise KernelFolderRefused("this platform cannot check a folder's owner without following symlinks")
    folder = Path(os.path.normpath(folder))  # ".." taken lexically: no component may be a symlink anyway
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    current = Path(folder.anchor)
    directory = os.open(current, flags & ~os.O_NOFOLLOW)  # "/" is never a symlink
    try:
        for part in folder.parts[1:]:
            current = current / part
            created = _make_private(directory, part)
            child = _open_component(directory, part, current, flags)
            os.close(directory)
            directory = child
            if created or current == folder:
                _check_private(os.fstat(directory), current, "folder")
    except BaseException:
        os.close(directory)
        raise
    return directory


def _load_private_library(directory: int, library: Path) -> ctypes.CDLL:
    """Load the library in the (checked) folder if it is a regular file, not a symlink, owned by this user and
    not writable by group or others (KernelFolderRefused otherwise). On Linux the file checked is the file
    loaded: dlopen gets /proc/self/fd/N of the descriptor that was checked, and that descriptor stays open
    (dlopen treats two loads of one name as one library: a number still open is never another file's)."""
    try:
        descriptor = os.open(library.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory)
    except OSError as error:
        if _is_symlink(directory, library.name):
            raise KernelFolderRefused(f"kernel library {library} is a symlink") from error
        raise
    try:
        _check_private(os.fstat(descriptor), library, "library")
        through = Path(f"/proc/self/fd/{descriptor}")
        loaded = ctypes.CDLL(str(through) if through.exists() else str(library))
    except BaseException:
        os.close(descriptor)
        raise
    return loaded


def _make_private(directory: int, name: str) -> bool:
    try:
        os.mkdir(name, 0o700, dir_fd=directory)
    except FileExistsError:
        return False
    return True


def _open_component(directory: int, name: str, path: Path, flags: int) -> int:
    try:
        return os.open(name, flags, dir_fd=directory)
    except OSError as error:
        if _is_symlink(directory, name):
            raise KernelFolderRefused(f"{path} is a symlink (not followed for the kernel folder)") from error
        if error.errno == errno.ENOTDIR:
            raise KernelFolderRefused(f"{path} is not a directory") from error
        raise


def _is_symlink(directory: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(name, dir_fd=directory).st_mode)
    except OSError:
        return False


def _check_private(status: os.stat_result, path: Path, what: str) -> None:
    expected = stat.S_ISDIR if what == "folder" else stat.S_ISREG
    if not expected(status.st_mode):
        raise KernelFolderRefused(f"kernel {what} {path} is not a {'directory' if what == 'folder' else 'file'}")
    if status.st_uid != os.geteuid():
        raise KernelFolderRefused(f"kernel {what} {path} is owned by uid {status.st_uid}, not by this user "
                                  f"(uid {os.geteuid()})")
    if status.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise KernelFolderRefused(f"kernel {what} {path} is writable by group or others "
                                  f"(mode {stat.S_IMODE(status.st_mode):o})")


def _entry_exists(directory: int, name: str) -> bool:
    try:
        os.lstat(name, dir_fd=directory)
    except FileNotFoundError:
        return False
    return True


def _path_through(directory: int, folder: Path) -> str:
    """A path that reaches the open folder (Linux: /proc/self/fd), whatever happens to the folder's path
    meanwhile; elsewhere the checked path itself."""
    through = Path(f"/proc/self/fd/{directory}")
    return str(through) if through.is_dir() else str(folder)


def openmp_runtimes() -> set[str]:
    """The OpenMP runtime libraries mapped into this process (one is PyTorch's own)."""
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return set()
    names = ("libgomp", "libiomp", "libomp")
    return {line.split()[-1] for line in maps if any(name in line.rsplit("/", 1)[-1] for name in names)}


def _compile(compiler: str, directory: int, folder: Path, name: str, variant: Variant = NATIVE) -> None:
    """Compile into a private temporary name inside the checked folder, then rename it into place (atomic: a
    concurrent start sees no library or the whole one). The compiler runs in the folder itself (its
    descriptor), so nothing it writes can land in a folder swapped in on the way."""
    stem = f".{name}.{os.getpid()}.{secrets.token_hex(4)}"
    partial, obj = f"{stem}.tmp", f"{stem}.o"
    cwd = _path_through(directory, folder)
    failure: subprocess.CompletedProcess[str] | None = None
    try:
        for compile_flags, link_flags in zip(COMPILE_FLAG_SETS, LINK_FLAG_SETS, strict=True):
            for command in ([compiler, *compile_flags, *variant.compile_flags, "-c", "-o", obj, str(SOURCE)],
                            [compiler, "-o", partial, obj, *link_flags, *variant.link_flags]):
                failure = subprocess.run(
                    command, capture_output=True, text=True, timeout=120, cwd=cwd, pass_fds=(directory,)
                )
                if failure.returncode:
                    break
            else:
                os.chmod(partial, 0o700, dir_fd=directory)  # whatever the umask: the load refuses g/o write
                os.replace(partial, name, src_dir_fd=directory, dst_dir_fd=directory)
                logger.info("Fused CPU kernels compiled: %s", folder / name)
                return
    finally:
        for leftover in (obj, partial):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover, dir_fd=directory)
    assert failure is not None
    raise subprocess.CalledProcessError(failure.returncode, failure.args, failure.stdout, failure.stderr)


def _build_key(compiler: str, variant: Variant = NATIVE) -> str:
    """What the library depends on: source, header, flags, compiler version and CPU (-march=native)."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    cpu = _cpu_flags()
    flag_sets = (*COMPILE_FLAG_SETS, *LINK_FLAG_SETS, variant.compile_flags, variant.link_flags)
    flags = " ".join(" ".join(f) for f in flag_sets)
    sources = SOURCE.read_bytes() + HEADER_PATH.read_bytes()
    digest = hashlib.sha256(sources + flags.encode() + version.encode() + cpu.encode())
    return digest.hexdigest()[:16]


def _cpu_flags() -> str:
    """-march=native builds for this CPU: a library compiled on another one must not be reused."""
    try:
        first_cpu = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        return platform.processor()
    return "\n".join(line for line in first_cpu.splitlines() if line.startswith(("flags", "Features", "model name")))
