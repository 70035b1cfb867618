"""Which weight format serves which batch size, and the factory that builds every linear layer by it.

``TEXTGEN_WEIGHTS`` names the format: ``float`` (the model dtype, bf16 or float32), ``bf16``,
``int8`` (weight-only), ``w8a8`` (int8 weights and activations), ``int4``, or ``auto``. ``auto`` is
measured per machine (``calibrate.py``): a Q4 GGUF source keeps its 4-bit blocks for the batch sizes
where reading fewer bytes wins, and another format (w8a8 or a float copy, whichever measures faster)
serves larger batches where arithmetic dominates.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from textgen.engine.core.activations import outlier_channels
from textgen.engine.core.fused import MAX_WIDTH as MAX_FUSED_WIDTH
from textgen.engine.core.fused import FusedKernels
from textgen.engine.core.gguf_blocks import Int4Blocks
from textgen.engine.core.linear import (
    FUSED_DTYPES,
    FloatKernel,
    Int4Kernel,
    Int8Kernel,
    Kernel,
    Linear,
    Q4Kernel,
    Q8Kernel,
    W8A8Kernel,
    fuse_rows,
    int4_supported,
    int8_supported,
    w8a8_supported,
)
from textgen.gguf_formats import Blocks, concat, four_bit_groups

logger = logging.getLogger(__name__)

UNBOUNDED = math.inf
GGUF = "gguf"  # the plan's format for weights kept in their GGUF block formats


class BlockSource(Protocol):
    """Projection weights by transformers' layer name, as GGUF blocks or floats (gguf_model.GGUFWeights)."""

    def __contains__(self, layer: str) -> bool: ...

    def blocks(self, layer: str) -> Blocks | torch.Tensor: ...


@dataclass(frozen=True)
class Projection:
    """A linear map given as weight [out, in] and optional bias [out]."""

    weight: torch.Tensor
    bias: torch.Tensor | None


@dataclass(frozen=True)
class WeightPlan:
    """Formats by batch size: ``tiers`` = ((max_rows, format), ...), the last one unbounded.

    Formats: "int4", "int8", "w8a8", "gguf" (a GGUF file's own blocks), or a float dtype name ("bfloat16",
    "float32", "float16").
    """

    tiers: tuple[tuple[float, str], ...]

    @classmethod
    def single(cls, fmt: str) -> WeightPlan:
        return cls(((UNBOUNDED, fmt),))

    def describe(self) -> str:
        parts, low = [], 1
        for max_rows, fmt in self.tiers:
            if max_rows == UNBOUNDED:
                parts.append(f"{fmt} for batches >= {low}" if low > 1 else fmt)
            else:
                parts.append(f"{fmt} for batches {low}-{int(max_rows)}")
                low = int(max_rows) + 1
        return ", ".join(parts)

    @property
    def formats(self) -> list[str]:
        return [fmt for _, fmt in self.tiers]


class LinearFactory:
    """Builds every linear layer of a model by the plan; fuses layers that share an input."""

    def __init__(
        self,
        plan: WeightPlan,
        compute_dtype: torch.dtype,
        device: torch.device,
        int4_blocks: dict[str, Int4Blocks] | None = None,
        input_ranges: Callable[[], dict[str, torch.Tensor]] | None = None,
        fused: FusedKernels | None = None,
        gguf: BlockSource | None = None,
    ) -> None:
        self.plan = plan
        self._gguf = gguf  # weights read directly from a GGUF file: their blocks, not the modules' weights
        self.compute_dtype = compute_dtype
        self.device = device
        self._blocks = int4_blocks or {}
        self._measure_ranges = input_ranges
        self._ranges: dict[str, torch.Tensor] | None = None
        self._fused = fused  # fused.c's w8a8 quantize/rescale, where it was built
        self.fallbacks: set[str] = set()

    def __call__(
        self,
        names: Sequence[str],
        layers: Sequence[torch.nn.Module | Projection],
        out_dtype: torch.dtype | None = None,
    ) -> Linear:
        if self._gguf is not None and all(name in self._gguf for name in names):
            return self._from_gguf(names, layers, out_dtype or self.compute_dtype)
        projections = [_projection(layer) for layer in layers]
        weight = fuse_rows([p.weight for p in projections])
        bias = _fused_bias([p.bias for p in projections])
        dtype = out_dtype or self.compute_dtype
        kernels = self._tiers(lambda fmt: self._kernel(fmt, names, weight, bias, dtype))
        return Linear(kernels, dtype, in_features=weight.shape[1])

    def _tiers(self, build: Callable[[str], Kernel]) -> list[tuple[float, Kernel]]:
        """The plan's tiers as (max_rows, kernel), one kernel built per format however many tiers name it."""
        built: dict[str, Kernel] = {}
        for _, fmt in self.plan.tiers:
            if fmt not in built:
                built[fmt] = build(fmt)
        return [(max_rows, built[fmt]) for max_rows, fmt in self.plan.tiers]

    def _kernel(
        self, fmt: str, names: Sequence[str], weight: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype
    ) -> Kernel:
        if fmt == "int4" and int4_supported(weight.shape[1], self.device):
            blocks = [self._blocks.get(name) for name in names]
            if all(b is not None for b in blocks):
                q = fuse_rows([b.q for b in blocks if b is not None])
                scale = fuse_rows([b.scale for b in blocks if b is not None])
                zero = fuse_rows([b.zero for b in blocks if b is not None])
                dtypes = {self.compute_dtype, out_dtype}
                if Q4Kernel.fits(q.shape[0], q.shape[1], self._fused) and dtypes <= FUSED_DTYPES:
                    assert self._fused is not None
                    m = zero - 8 * scale  # the file's own m (zero was computed from it)
                    outliers = self._outliers(names, q.shape[1])
                    return Q4Kernel.pack(q, scale, m, bias, outliers, self._fused, self.compute_dtype, out_dtype)
                return Int4Kernel.from_blocks(q, scale, zero, bias)
            if self._blocks:
                # A Q4 file with no 4-bit blocks for this layer (SmolLM2's output head is Q8_0): 8 bits
                # keep what the file stored; re-quantizing it to 4 bits costs ~5% perplexity. Integer
                # products (w8a8) read the same bytes as weight-only int8 and compute faster.
                if w8a8_supported(self.device) and self._measure_ranges is not None:
                    return self._w8a8(names, weight, bias, out_dtype)
                return Int8Kernel.quantize(weight, bias)
            return Int4Kernel.quantize(weight, bias)
        if fmt == "int8" and int8_supported(self.device):
            return Int8Kernel.quantize(weight, bias)
        if fmt == "w8a8" and w8a8_supported(self.device) and self._measure_ranges is not None:
            return self._w8a8(names, weight, bias, out_dtype)
        if fmt in ("int4", "int8", "w8a8"):
            self.fallbacks.add(fmt)
            fmt = str(self.compute_dtype).removeprefix("torch.")
        dtype = getattr(torch, fmt)
        return FloatKernel.build(
            weight.to(self.device, dtype), None if bias is None else bias.to(self.device, dtype), pack=True
        )

    def _from_gguf(
        self, names: Sequence[str], layers: Sequence[torch.nn.Module | Projection], out_dtype: torch.dtype
    ) -> Linear:
        """A layer whose weights come from a GGUF file: its blocks for the plan's "gguf" tiers, floats
        de-quantized from them for any other format the plan names."""
        assert self._gguf is not None
        parts = [self._gguf.blocks(name) for name in names]
        bias = _fused_bias([getattr(layer, "bias", None) for layer in layers])
        weight: torch.Tensor | None = None

        def build(fmt: str) -> Kernel:
            nonlocal weight
            kernel = self._block_kernel(parts, bias, out_dtype) if fmt == GGUF else None
            if kernel is None:
                if weight is None:  # de-quantized once, for the first tier that needs floats
                    weight = fuse_rows([p.dequantize() if isinstance(p, Blocks) else p.float() for p in parts])
                kernel = self._kernel(
                    fmt if fmt != GGUF else _float_name(self.compute_dtype), names, weight, bias, out_dtype
                )
            return kernel

        return Linear(self._tiers(build), out_dtype, in_features=parts[0].shape[1])

    def _block_kernel(
        self, parts: Sequence[Blocks | torch.Tensor], bias: torch.Tensor | None, out_dtype: torch.dtype
    ) -> Kernel | None:
        """The block kernel for these weights (Q4 for 4-bit blocks, Q8 for the wider ones); None where none
        applies (float tensors, no fused.c, or shapes it does not take)."""
        blocks = [p for p in parts if isinstance(p, Blocks)]
        if len(blocks) != len(parts) or not ({self.compute_dtype, out_dtype} <= FUSED_DTYPES):
            return None
        merged = concat(blocks)
        out_features, in_features = merged.shape
        none = torch.empty(0, dtype=torch.long)
        if merged.bits == 4 and Q4Kernel.fits(out_features, in_features, self._fused):
            assert self._fused is not None
            q, d, m = four_bit_groups(merged)
            return Q4Kernel.pack(q, d, m, bias, none, self._fused, self.compute_dtype, out_dtype)
        if Q8Kernel.fits(out_features, in_features, self._fused):
            assert self._fused is not None
            return Q8Kernel.pack(merged.q, merged.d, merged.m, bias, none, self._fused, self.compute_dtype, out_dtype)
        self.fallbacks.add(GGUF)
        return None

    def _outliers(self, names: Sequence[str], in_features: int) -> torch.Tensor:
        """The input channels of the layer called names[0] that int8 activations keep in float (none when
        no activation ranges can be measured)."""
        if self._measure_ranges is None:
            return torch.empty(0, dtype=torch.long)
        if self._ranges is None:
            self._ranges = self._measure_ranges()  # once, on the first layer that needs it
        return outlier_channels(self._ranges, names[0], in_features)

    def _w8a8(
        self, names: Sequence[str], weight: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype
    ) -> Kernel:
        assert self._measure_ranges is not None
        outliers = self._outliers(names, weight.shape[1])
        fused_fits = weight.shape[1] <= MAX_FUSED_WIDTH and {self.compute_dtype, out_dtype} <= FUSED_DTYPES
        if self._fused is None or not fused_fits:
            return W8A8Kernel.quantize(weight, bias, outliers)
        return W8A8Kernel.quantize(weight, bias, outliers, self._fused, self.compute_dtype, out_dtype)


def _fused_bias(biases: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    """The biases of layers fused by rows, as one; None unless every layer has one."""
    present = [b.detach() for b in biases if b is not None]
    return fuse_rows(present) if len(present) == len(biases) else None


def _float_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _projection(layer: torch.nn.Module | Projection) -> Projection:
    if isinstance(layer, Projection):
        return layer
    weight, bias = getattr(layer, "weight", None), getattr(layer, "bias", None)
    if not isinstance(weight, torch.Tensor) or not (bias is None or isinstance(bias, torch.Tensor)):
        raise TypeError(f"{type(layer).__name__} has no weight tensor (and an optional bias) to project with")
    return Projection(weight.detach(), None if bias is None else bias.detach())
