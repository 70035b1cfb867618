"""Read a GGUF file's Q4_1 weight blocks as they are stored, for the int4 kernel.

transformers de-quantizes GGUF files to floats when it loads them; the decode core would rather keep
the 4-bit blocks. This module maps a Llama-family GGUF's tensor names onto the HF layer names and
undoes llama.cpp's row permutation of the query and key projections (GGUF stores them interleaved for
its own rotary layout; transformers' weights, and so the core's rotary code, use the split-half one).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from textgen.engine.core.linear import q4_1_to_int4
from textgen.loader import gguf_fingerprint

logger = logging.getLogger(__name__)

Q4_1 = "Q4_1"
HF_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


@dataclass(frozen=True)
class Int4Blocks:
    """One layer's weight as int4 groups: w = (q - 8) * scale + zero."""

    q: torch.Tensor  # [out, K] integers in 0..15
    scale: torch.Tensor  # [out, K / 32] float32
    zero: torch.Tensor  # [out, K / 32] float32

    def dequantize(self) -> torch.Tensor:
        out_features, k = self.q.shape
        groups = (self.q.float() - 8).reshape(out_features, -1, 32)
        return (groups * self.scale[..., None] + self.zero[..., None]).reshape(out_features, k)


def read_q4_1_blocks(path: Path, num_heads: int, num_kv_heads: int) -> dict[str, Int4Blocks]:
    """HF layer name ("model.layers.3.mlp.up_proj") -> its Q4_1 blocks; other tensors are skipped."""
    from gguf import GGUFReader  # imported here: only GGUF sources pay for it

    found: dict[str, Int4Blocks] = {}
    for tensor in GGUFReader(str(path)).tensors:
        name = _hf_name(tensor.name)
        if name is None or tensor.tensor_type.name != Q4_1:
            continue
        in_features, out_features = (int(n) for n in tensor.shape)  # GGUF lists the fastest dimension first
        raw = torch.from_numpy(tensor.data.copy())
        q, scale, zero = q4_1_to_int4(raw, out_features, in_features)
        if name.endswith("q_proj"):
            q, scale, zero = _unpermute_rows((q, scale, zero), num_heads)
        elif name.endswith("k_proj"):
            q, scale, zero = _unpermute_rows((q, scale, zero), num_kv_heads)
        found[name] = Int4Blocks(q, scale, zero)
    return found


def _hf_name(gguf_name: str) -> str | None:
    parts = gguf_name.split(".")  # blk.{i}.{kind}.weight
    if len(parts) != 4 or parts[0] != "blk" or parts[3] != "weight" or parts[2] not in HF_NAMES:
        return None
    return f"model.layers.{parts[1]}.{HF_NAMES[parts[2]]}"


def _unpermute_rows(tensors: tuple[torch.Tensor, ...], heads: int) -> tuple[torch.Tensor, ...]:
    """GGUF row order (per head: pairs interleaved) -> HF order (per head: first halves, then second)."""
    rows = tensors[0].shape[0]
    half = rows // heads // 2
    order = torch.arange(rows).reshape(heads, half, 2).transpose(1, 2).reshape(rows)
    return tuple(t[order] for t in tensors)


def cached_q4_1_blocks(
    path: Path, cache_dir: Path, num_heads: int, num_kv_heads: int
) -> dict[str, Int4Blocks]:
    """``read_q4_1_blocks``, cached beside the converted model: parsing a GGUF file's metadata takes
    seconds, loading this cache a fraction of one. Empty when the file has no Q4_1 layer weights."""
    cache = cache_dir / f"{path.stem}-{gguf_fingerprint(path)}-q4_1.safetensors"
    if cache.is_file():
        return _from_tensors(load_file(cache))
    blocks = read_q4_1_blocks(path, num_heads, num_kv_heads)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        staging = cache.with_name(cache.name + f".tmp-{os.getpid()}")
        save_file(_to_tensors(blocks), staging)
        staging.rename(cache)
    except OSError as error:
        logger.warning("Could not cache Q4_1 blocks under %s (%s); next start reads the GGUF again", cache_dir, error)
    return blocks


def _to_tensors(blocks: dict[str, Int4Blocks]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for name, b in blocks.items():
        tensors[f"{name}.q"] = b.q.to(torch.uint8).contiguous()
        tensors[f"{name}.scale"] = b.scale.contiguous()
        tensors[f"{name}.zero"] = b.zero.contiguous()
    return tensors


def _from_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, Int4Blocks]:
    names = {key.rsplit(".", 1)[0] for key in tensors}
    return {n: Int4Blocks(tensors[f"{n}.q"], tensors[f"{n}.scale"], tensors[f"{n}.zero"]) for n in names}
