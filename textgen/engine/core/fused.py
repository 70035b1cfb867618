"""The kernels of ``fused.c``: built with the system C compiler on first use, loaded with ctypes. They
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


def build_fused_kernels(folder: Path | None = None) -> KernelBuild:
    """Build (once per source, CPU and compiler) and load the library from a folder only this user can write.

    It is a build of this package's source for this machine, not model data, so by default it lives in
    the user's cache (``kernel_folder``), whatever TEXTGEN_CACHE_DIR says: every server, worker and test
    of this user shares one build. Loaded once per process and folder (the core and the engine's sampler
    ask for the same library), so a problem is logged once, as a WARNING naming the reason and the fix;
    the caller runs PyTorch's operators instead and reports ``problem`` (``/ready``, the bench header).
    """
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    return _load(folder if folder is not None else kernel_folder(), compiler)


def kernel_folder() -> Path:
    """``$XDG_CACHE_HOME/textgen/kernels``, else ``~/.cache/textgen/kernels``: under the service user's own
    home, never a shared temporary folder (where another local user could create the folder first)."""
    cache = os.environ.get("XDG_CACHE_HOME")
    base = Path(cache) if cache and Path(cache).is_absolute() else Path.home() / ".cache"
    return base / "textgen" / "kernels"


@functools.cache
def _load(folder: Path, compiler: str | None) -> KernelBuild:
    if compiler is None:
        return _unavailable("no C compiler found", "install gcc, or set CC to a C compiler")
    try:
        directory = open_private_folder(folder)
    except KernelFolderRefused as refused:
        return _unavailable(str(refused), _FOLDER_FIX.format(folder=folder))
    except OSError as error:
        return _unavailable(f"kernel folder {folder}: {error}", _FOLDER_FIX.format(folder=folder))
    try:
        key = _build_key(compiler)
        name = f"fused-{key}.so"
        if not _entry_exists(directory, name):
            _compile(compiler, directory, folder, name)
        kernels = FusedKernels(_load_private_library(directory, folder / name), key)
    except KernelFolderRefused as refused:
        return _unavailable(str(refused), f"delete it (rm {folder / name}) so that it is rebuilt")
    except (OSError, subprocess.SubprocessError) as error:
        return _unavailable(f"the build failed ({_first_line(error)})", "check that CC compiles C (gcc)")
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


def _compile(compiler: str, directory: int, folder: Path, name: str) -> None:
    """Compile into a private temporary name inside the checked folder, then rename it into place (atomic: a
    concurrent start sees no library or the whole one). The compiler runs in the folder itself (its
    descriptor), so nothing it writes can land in a folder swapped in on the way."""
    stem = f".{name}.{os.getpid()}.{secrets.token_hex(4)}"
    partial, obj = f"{stem}.tmp", f"{stem}.o"
    cwd = _path_through(directory, folder)
    failure: subprocess.CompletedProcess[str] | None = None
    try:
        for compile_flags, link_flags in zip(COMPILE_FLAG_SETS, LINK_FLAG_SETS, strict=True):
            for command in ([compiler, *compile_flags, "-c", "-o", obj, str(SOURCE)],
                            [compiler, "-o", partial, obj, *link_flags]):
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
