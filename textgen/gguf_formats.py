"""GGUF weight blocks as the decode core keeps them: unpacked, exactly, from the file's bytes.

Every block format llama.cpp stores a weight in is, after unpacking, an unsigned integer code per
weight with a scale and an offset per small group: w = d * q + m. ``Blocks`` is that form with groups
of 16 weights (the smallest group any kept format uses, Q6_K's), with d and m in float32, which holds
every format's products exactly (an f16 super-block scale times a 6- or 8-bit sub-scale needs at most
19 significant bits). From it:

* the 4-bit formats (Q4_0, Q4_1, Q4_K: one d and m per 32 weights) go to the Q4 kernel (linear.Q4Kernel),
  which reads 4 bits per weight plus float16 d and m;
* the wider ones (Q8_0, Q6_K, Q5_K, and Q5_0 / Q5_1, which are converted with no rounding at all) go to
  the 8-bit block kernel (linear.Q8Kernel): one byte per weight plus d and m per 16;
* float tensors (F32, F16, BF16) stay floats.

``dequantize`` gives w in float32, matching gguf-py's reference de-quantization value for value (tests
compare them on every format).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

GROUP = 16  # weights per (d, m) pair in Blocks
SUPER = 256  # weights per K-quant super-block

FLOAT_TYPES = ("F32", "F16", "BF16")
FOUR_BIT = ("Q4_0", "Q4_1", "Q4_K")  # served by the Q4 kernel
EIGHT_BIT = ("Q8_0", "Q6_K", "Q5_K")  # served by the 8-bit block kernel
CONVERTED = ("Q5_0", "Q5_1")  # not kept as such: exactly representable in the 8-bit block kernel
KEPT = (*FOUR_BIT, *EIGHT_BIT, *FLOAT_TYPES)
READABLE = (*KEPT, *CONVERTED)


class UnsupportedBlockType(ValueError):
    """A tensor type this reader does not unpack (the message names it and the types it does)."""


@dataclass(frozen=True)
class Blocks:
    """A weight [out, K] as w = d * q + m per group of 16 input columns."""

    q: torch.Tensor  # [out, K] uint8
    d: torch.Tensor  # [out, K / 16] float32
    m: torch.Tensor  # [out, K / 16] float32
    bits: int  # 4 when every q < 16 and d, m are constant over groups of 32 (the Q4 kernel's shape), else 8
    source: str  # the GGUF type it came from

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.q.shape[0]), int(self.q.shape[1]))

    def dequantize(self) -> torch.Tensor:
        out, k = self.shape
        groups = self.q.to(torch.float32).reshape(out, k // GROUP, GROUP)
        return (groups * self.d[..., None] + self.m[..., None]).reshape(out, k)

    def rows(self, index: torch.Tensor) -> Blocks:
        return Blocks(self.q[index], self.d[index], self.m[index], self.bits, self.source)


def concat(parts: list[Blocks]) -> Blocks:
    """Stack the output rows of several weights fed by the same input (q, k, v; gate, up)."""
    bits = max(p.bits for p in parts)
    sources = "+".join(sorted({p.source for p in parts}))
    return Blocks(
        torch.cat([p.q for p in parts]), torch.cat([p.d for p in parts]), torch.cat([p.m for p in parts]), bits, sources
    )


def _f16(raw: torch.Tensor) -> torch.Tensor:
    """[..., 2] bytes -> [...] float32."""
    return raw.contiguous().view(torch.float16).squeeze(-1).to(torch.float32)


def _per_group(values: torch.Tensor, weights_each: int) -> torch.Tensor:
    """[rows, n] values shared by runs of weights_each weights -> one per group of 16."""
    return values.repeat_interleave(weights_each // GROUP, dim=-1) if weights_each > GROUP else values


def _nibbles_32(qs: torch.Tensor) -> torch.Tensor:
    """[..., 16] bytes of a 32-weight block: low nibbles are weights 0-15, high nibbles 16-31 -> [..., 32]."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _high_bits_32(qh: torch.Tensor) -> torch.Tensor:
    """[..., 4] bytes of a 32-bit little-endian mask -> [..., 32] bits (bit j is weight j's fifth bit)."""
    bits = torch.arange(8, dtype=torch.uint8)
    return ((qh[..., :, None] >> bits) & 1).reshape(*qh.shape[:-1], 32)


def _q4_0(raw: torch.Tensor, rows: int) -> Blocks:
    b = raw.reshape(rows, -1, 18)
    d = _f16(b[..., 0:2])
    q = _nibbles_32(b[..., 2:18]).reshape(rows, -1)
    return Blocks(q, _per_group(d, 32), _per_group(-8 * d, 32), 4, "Q4_0")


def _q4_1(raw: torch.Tensor, rows: int) -> Blocks:
    b = raw.reshape(rows, -1, 20)
    d, m = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    q = _nibbles_32(b[..., 4:20]).reshape(rows, -1)
    return Blocks(q, _per_group(d, 32), _per_group(m, 32), 4, "Q4_1")


def _q5_0(raw: torch.Tensor, rows: int) -> Blocks:
    b = raw.reshape(rows, -1, 22)
    d = _f16(b[..., 0:2])
    q = (_nibbles_32(b[..., 6:22]) | (_high_bits_32(b[..., 2:6]) << 4)).reshape(rows, -1)
    return Blocks(q, _per_group(d, 32), _per_group(-16 * d, 32), 8, "Q5_0")


def _q5_1(raw: torch.Tensor, rows: int) -> Blocks:
    b = raw.reshape(rows, -1, 24)
    d, m = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    q = (_nibbles_32(b[..., 8:24]) | (_high_bits_32(b[..., 4:8]) << 4)).reshape(rows, -1)
    return Blocks(q, _per_group(d, 32), _per_group(m, 32), 8, "Q5_1")


def _q8_0(raw: torch.Tensor, rows: int) -> Blocks:
    b = raw.reshape(rows, -1, 34)
    d = _f16(b[..., 0:2])
    q = (b[..., 2:34].contiguous().view(torch.int8).to(torch.int16) + 128).to(torch.uint8).reshape(rows, -1)
    return Blocks(q, _per_group(d, 32), _per_group(-128 * d, 32), 8, "Q8_0")


def _k_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: 12 bytes of 6-bit scales and minimums for the 8 sub-blocks -> ([..., 8], [..., 8])."""
    s = scales.reshape(*scales.shape[:-1], 3, 4)
    low, mid, top = s[..., 0, :], s[..., 1, :], s[..., 2, :]
    sc = torch.cat([low & 0x3F, (top & 0x0F) | ((low >> 2) & 0x30)], dim=-1)
    mn = torch.cat([mid & 0x3F, (top >> 4) | ((mid >> 2) & 0x30)], dim=-1)
    return sc.to(torch.float32), mn.to(torch.float32)


def _q4_k(raw: torch.Tensor, rows: int) -> Blocks:
    b = raw.reshape(rows, -1, 144)
    d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    sc, mn = _k_scales(b[..., 4:16])
    qs = b[..., 16:144].reshape(rows, -1, 4, 1, 32)  # 4 chunks of 32 bytes: low nibbles, then high
    q = ((qs >> torch.tensor([0, 4], dtype=torch.uint8).reshape(2, 1)) & 0x0F).reshape(rows, -1)
    scale = (d[..., None] * sc).reshape(rows, -1)
    minimum = -(dmin[..., None] * mn).reshape(rows, -1)
    return Blocks(q, _per_group(scale, 32), _per_group(minimum, 32), 4, "Q4_K")


def _q5_k(raw: torch.Tensor, rows: int) -> Blocks:
    b = raw.reshape(rows, -1, 176)
    d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    sc, mn = _k_scales(b[..., 4:16])
    qh = b[..., 16:48].reshape(rows, -1, 1, 32) >> torch.arange(8, dtype=torch.uint8).reshape(8, 1)
    qs = b[..., 48:176].reshape(rows, -1, 4, 1, 32) >> torch.tensor([0, 4], dtype=torch.uint8).reshape(2, 1)
    low = (qs & 0x0F).reshape(rows, -1, 8, 32)
    q = (low | ((qh & 1) << 4)).reshape(rows, -1)
    scale = (d[..., None] * sc).reshape(rows, -1)
    minimum = -(dmin[..., None] * mn).reshape(rows, -1)
    return Blocks(q, _per_group(scale, 32), _per_group(minimum, 32), 8, "Q5_K")


def _q6_k(raw: torch.Tensor, rows: int) -> Blocks:
    b = raw.reshape(rows, -1, 210)
    ql = b[..., 0:128].reshape(rows, -1, 2, 1, 64) >> torch.tensor([0, 4], dtype=torch.uint8).reshape(2, 1)
    ql = (ql & 0x0F).reshape(rows, -1, 2, 4, 32)
    qh = b[..., 128:192].reshape(rows, -1, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(4, 1)
    q = (ql | ((qh & 3) << 4)).reshape(rows, -1)
    sc = b[..., 192:208].contiguous().view(torch.int8).to(torch.float32)  # [rows, supers, 16]
    d = _f16(b[..., 208:210])
    scale = (d[..., None] * sc).reshape(rows, -1)
    return Blocks(q, scale, -32 * scale, 8, "Q6_K")


UNPACK: dict[str, Callable[[torch.Tensor, int], Blocks]] = {
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q5_0": _q5_0,
    "Q5_1": _q5_1,
    "Q8_0": _q8_0,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
}


def unpack(raw: np.ndarray | torch.Tensor, type_name: str, shape: tuple[int, int]) -> Blocks:
    """A quantized 2-D weight's bytes ([rows, bytes per row], as stored) -> Blocks of shape [out, K]."""
    if type_name not in UNPACK:
        raise UnsupportedBlockType(
            f"GGUF tensor type {type_name} cannot be unpacked; supported: {', '.join(sorted(UNPACK))} and "
            f"{', '.join(FLOAT_TYPES)}"
        )
    data = raw if isinstance(raw, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(raw).copy())
    rows, k = shape
    blocks = UNPACK[type_name](data.reshape(rows, -1), rows)
    assert blocks.shape == (rows, k), (blocks.shape, shape, type_name)
    return blocks


def float_tensor(raw: np.ndarray | torch.Tensor, type_name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A float tensor's bytes -> a tensor in its own dtype (float32, float16 or bfloat16)."""
    dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    if type_name not in dtypes:
        raise UnsupportedBlockType(f"GGUF tensor type {type_name} is not a float type ({', '.join(dtypes)})")
    data = raw if isinstance(raw, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(raw).copy())
    return data.reshape(-1).view(dtypes[type_name]).reshape(shape)


def dequantize(raw: np.ndarray | torch.Tensor, type_name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Any readable tensor's bytes -> float32 values (norms, embeddings, the reference path)."""
    if type_name in FLOAT_TYPES:
        return float_tensor(raw, type_name, shape).to(torch.float32)
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    if type_name == "Q8_0":
        return _q8_0_values(raw, rows).reshape(shape)
    return unpack(raw, type_name, (rows, shape[-1])).dequantize().reshape(shape)


def _q8_0_values(raw: np.ndarray | torch.Tensor, rows: int) -> torch.Tensor:
    """Q8_0 straight to float32, d * q (the value ``Blocks``' d * (q + 128) - 128 d gives: every product and
    the sum are exact in float32). Half the passes of the general path: a start-up de-quantizes Gemma's
    262k-row Q8_0 input embedding with it (~1 s of CPU less)."""
    data = raw if isinstance(raw, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(raw).copy())
    b = data.reshape(rows, -1, 34)
    d = _f16(b[..., 0:2])  # [rows, blocks]
    q = b[..., 2:34].contiguous().view(torch.int8)  # [rows, blocks, 32]
    return (q.to(torch.float32) * d[..., None]).reshape(rows, -1)


def dequantize_rows(
    raw: np.ndarray, type_name: str, shape: tuple[int, int], dtype: torch.dtype, chunk: int = 16384
) -> torch.Tensor:
    """A 2-D tensor's values in ``dtype``, de-quantized a chunk of rows at a time (a 262k-row embedding
    never exists in float32 whole); each value is the float32 de-quantization rounded once to dtype."""
    rows, k = shape
    out = torch.empty(rows, k, dtype=dtype)
    for start in range(0, rows, chunk):
        stop = min(rows, start + chunk)
        out[start:stop] = dequantize(raw[start:stop], type_name, (stop - start, k)).to(dtype)
    return out


def four_bit_groups(blocks: Blocks) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [out, K], d and m [out, K / 32] for the Q4 kernel (blocks.bits == 4: groups of 32 share d, m)."""
    assert blocks.bits == 4, blocks.source
    return blocks.q, blocks.d[:, ::2].contiguous(), blocks.m[:, ::2].contiguous()
