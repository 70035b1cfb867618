"""The kernels of ``fused.c``: built with the system C compiler on first use, loaded with ctypes. They
serve the Llama model step in bfloat16 on a CPU (``llama.step_fused``: decode rows and prompts alike),
the Q4_1 and w8a8 products (``linear.Q4Kernel``, ``linear.W8A8Kernel``) and top-p sampling
(``sampling.nucleus_by_rejection``).

Why C and ctypes rather than a PyTorch extension: the file is plain loops plus a few AVX-512
intrinsics, compiles in about a second with no PyTorch headers, and a ctypes call costs about what one
PyTorch operator does while replacing six to twenty of them. The library is built once per source, CPU
and compiler (``kernel_folder``); without a compiler the core runs its PyTorch path and says so in the
start-up log, and without AVX-512 VNNI int4 uses PyTorch's kernel.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("fused.c")
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
MAX_WIDTH, MAX_HEADS, MAX_DIM, MAX_LIVE = 8192, 64, 256, 8192  # as in fused.c

_i64, _int, _f32, _ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p


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


def _product_args(acc: torch.Tensor | None, source: Quantized | None, weights: W8A8Weights | None) -> list[object]:
    """fused.c's seven arguments for an int32 product to rescale (all NULL when there is none)."""
    if acc is None or source is None or weights is None:
        return [None] * 5 + [0, None]
    return [
        acc.data_ptr(), source.row_max.data_ptr(), weights.scales.data_ptr(), source.outlying.data_ptr(),
        weights.outlier_weight_t.data_ptr(), source.outlying.shape[1],
        None if weights.bias is None else weights.bias.data_ptr(),
    ]


@dataclass(frozen=True)
class FusedKernels:
    library: ctypes.CDLL
    build_key: str = ""  # source, flags, compiler and CPU the library was built for

    def __post_init__(self) -> None:
        self.library.add_rms_norm.argtypes = [_ptr, _ptr, _ptr, _ptr, _i64, _i64, _f32]
        self.library.rotary_cache_attention.argtypes = [_ptr] * 8 + [_i64] * 5 + [_f32]
        self.library.silu_mul.argtypes = [_ptr, _ptr, _i64, _i64]
        self.library.silu_mul.restype = None
        self.library.quantize_rows.argtypes = [_ptr, _int, _ptr, _i64, _ptr, _ptr, _ptr, _i64, _i64]
        self.library.dequantize_rows.argtypes = [_ptr] * 5 + [_i64, _ptr, _ptr, _int, _i64, _i64]
        self.library.dequantize_rows.restype = None
        self.library.sample_nucleus.argtypes = [_ptr] * 5 + [_i64] * 3
        product = [_ptr] * 5 + [_i64, _ptr]  # see _product_args
        self.library.residual_norm_quantize.argtypes = [_ptr, *product, _ptr, _f32, _ptr, _i64, *[_ptr] * 4, _i64, _i64]
        self.library.silu_quantize.argtypes = [*product, _ptr, _i64, *[_ptr] * 3, _i64, _i64]
        q4_args = [_ptr, _int, _ptr, _ptr, _ptr, _i64, _ptr, _ptr, _int, *[_i64] * 3, *[_ptr] * 4]
        self.library.q4_matmul.argtypes = q4_args
        self.library.q4_supported.argtypes = []
        self.library.set_parallel.argtypes = [_int]
        self.library.set_parallel.restype = None

    def add_rms_norm(
        self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, out: torch.Tensor, eps: float
    ) -> None:
        """x [N, E] += delta (in place, when given); out [N, E] = rms_norm(x) * weight [E]."""
        rows, width = x.shape
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
    ) -> None:
        """qkv [B, (Hq + 2 Hkv) D]; writes the rotated key and the value at each row's position in keys,
        values [S, Hkv, T, D] and the attention output over positions 0..position to out [B, Hq D]."""
        _, kv_heads, capacity, dim = keys.shape
        status = self.library.rotary_cache_attention(
            qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), positions.data_ptr(), cache_rows.data_ptr(),
            keys.data_ptr(), values.data_ptr(), out.data_ptr(), qkv.shape[0], heads, kv_heads, dim, capacity, scale,
        )
        _check(status, "rotary_cache_attention")

    def silu_mul(self, gate_up: torch.Tensor, out: torch.Tensor) -> None:
        """gate_up [N, 2F] -> out [N, F] = silu(gate) * up."""
        self.library.silu_mul(gate_up.data_ptr(), out.data_ptr(), out.shape[0], out.shape[1])

    def quantize_rows(self, x: torch.Tensor, outliers: torch.Tensor) -> Quantized:
        """x [N, K] bf16 or float32 -> its rows quantized for a w8a8 product (see W8A8Kernel)."""
        rows, width = x.shape
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
        rows, width = x.shape
        quantized = None if target is None else Quantized.empty(rows, width, target.outliers.numel())
        acc, source, weights = product if product is not None else (None, None, None)
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
        rows, features = acc.shape[0], acc.shape[1] // 2
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
        rows, cols = acc.shape
        out = torch.empty(rows, cols, dtype=out_dtype)
        self.library.dequantize_rows(
            acc.data_ptr(), row_max.data_ptr(), col_scale.data_ptr(), outlying.data_ptr(),
            outlier_weight_t.data_ptr(), outlying.shape[1], None if bias is None else bias.data_ptr(),
            out.data_ptr(), out_dtype == torch.bfloat16, rows, cols,
        )
        return out


    @property
    def q4_supported(self) -> bool:
        """Whether this build has the Q4_1 x int8 product (AVX-512 VNNI on this CPU)."""
        return bool(self.library.q4_supported())

    def q4_matmul(
        self,
        x: torch.Tensor,
        packed: torch.Tensor,
        scales: torch.Tensor,
        outliers: torch.Tensor,
        outlier_weight_t: torch.Tensor,
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        """x [N, K] bf16 or float32 times a weight packed by linear.Q4Kernel -> [N, out] in out_dtype; the
        outlier channels [k] of x are multiplied in float with outlier_weight_t [k, out]."""
        rows, k = x.shape
        x = x.contiguous()
        out_features = outlier_weight_t.shape[1]
        out = torch.empty(rows, out_features, dtype=out_dtype)
        xq = torch.empty(rows, k, dtype=torch.int8)
        xd, xsum, xout = torch.empty(rows, k // 32), torch.empty(rows, k // 32), torch.empty(rows, outliers.numel())
        status = self.library.q4_matmul(
            x.data_ptr(), x.dtype == torch.bfloat16, packed.data_ptr(), scales.data_ptr(), outliers.data_ptr(),
            outliers.numel(), outlier_weight_t.data_ptr(), out.data_ptr(), out_dtype == torch.bfloat16, rows,
            out_features, k, xq.data_ptr(), xd.data_ptr(), xsum.data_ptr(), xout.data_ptr(),
        )
        _check(status, "q4_matmul")
        return out

    def sample_nucleus(
        self, logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, uniforms: torch.Tensor
    ) -> torch.Tensor:
        """Top-p by rejection (sampling.nucleus_by_rejection) for logits [B, V] float32 on the CPU;
        temperature, top_p [B] float32; uniforms [B, draws]. -> token ids [B], -1 where every draw was
        rejected."""
        rows, vocab = logits.shape
        logits, uniforms = logits.contiguous(), uniforms.contiguous()
        temperature, top_p = temperature.contiguous(), top_p.contiguous()
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
    if status != 0:
        raise ValueError(f"fused {name}: shape beyond the limits of fused.c")


def load_fused_kernels(folder: Path | None = None) -> FusedKernels | None:
    """The compiled library (built once per source, CPU and compiler), or None where it cannot be built.

    It is a build of this package's source for this machine, not model data, so by default it lives in
    one folder per machine and user (``kernel_folder``), whatever TEXTGEN_CACHE_DIR says: every server,
    worker and test on the machine shares one build. Loaded once per process and folder: the core and
    the engine's sampler ask for the same library."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.info("Fused CPU kernels: no C compiler found (install gcc, or set CC); using PyTorch operators")
        return None
    return _load(folder or kernel_folder(), compiler)


@functools.cache
def _load(folder: Path, compiler: str) -> FusedKernels | None:
    try:
        key = _build_key(compiler)
        library = folder / f"fused-{key}.so"
        if not library.exists():
            _compile(compiler, library)
        kernels = FusedKernels(ctypes.CDLL(str(library)), key)
    except (OSError, subprocess.SubprocessError) as error:
        logger.warning("Fused CPU kernels unavailable (%s); using PyTorch operators", error)
        return None
    runtimes = openmp_runtimes()
    if len(runtimes) > 1:
        logger.warning("Fused CPU kernels run single-threaded: a second OpenMP runtime was loaded (%s)", runtimes)
        kernels.library.set_parallel(0)
    return kernels


def kernel_folder() -> Path:
    return Path(tempfile.gettempdir()) / f"textgen-kernels-{os.getuid() if hasattr(os, 'getuid') else 'user'}"


def openmp_runtimes() -> set[str]:
    """The OpenMP runtime libraries mapped into this process (one is PyTorch's own)."""
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return set()
    names = ("libgomp", "libiomp", "libomp")
    return {line.split()[-1] for line in maps if any(name in line.rsplit("/", 1)[-1] for name in names)}


def _compile(compiler: str, library: Path) -> None:
    library.parent.mkdir(parents=True, exist_ok=True)
    partial, obj = library.with_suffix(f".{os.getpid()}.tmp"), library.with_suffix(f".{os.getpid()}.o")
    failure: subprocess.CompletedProcess[str] | None = None
    try:
        for compile_flags, link_flags in zip(COMPILE_FLAG_SETS, LINK_FLAG_SETS, strict=True):
            for command in ([compiler, *compile_flags, "-c", "-o", str(obj), str(SOURCE)],
                            [compiler, "-o", str(partial), str(obj), *link_flags]):
                failure = subprocess.run(command, capture_output=True, text=True, timeout=120)
                if failure.returncode:
                    break
            else:
                partial.replace(library)  # atomic: a concurrent start sees the old file or the whole new one
                logger.info("Fused CPU kernels compiled: %s", library)
                return
    finally:
        obj.unlink(missing_ok=True)
    assert failure is not None
    raise subprocess.CalledProcessError(failure.returncode, failure.args, failure.stdout, failure.stderr)


def _build_key(compiler: str) -> str:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    cpu = _cpu_flags()
    flags = " ".join(" ".join(f) for f in (*COMPILE_FLAG_SETS, *LINK_FLAG_SETS))
    digest = hashlib.sha256(SOURCE.read_bytes() + flags.encode() + version.encode() + cpu.encode())
    return digest.hexdigest()[:16]


def _cpu_flags() -> str:
    """-march=native builds for this CPU: a library compiled on another one must not be reused."""
    try:
        first_cpu = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        return platform.processor()
    return "\n".join(line for line in first_cpu.splitlines() if line.startswith(("flags", "Features", "model name")))
