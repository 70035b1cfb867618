"""GGUF block formats read back exactly: each type written with gguf-py's writer, read by textgen's own
reader (textgen/gguf_file.py) and unpacker (textgen/gguf_formats.py), compared value for value with gguf-py's
reference de-quantization of the same bytes (read by gguf-py's own GGUFReader)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, quants

from textgen.gguf_file import GGUFError, read_gguf
from textgen.gguf_formats import (
    EIGHT_BIT,
    FOUR_BIT,
    UnsupportedBlockType,
    dequantize,
    dequantize_rows,
    four_bit_groups,
    unpack,
)

ROWS, COLS = 48, 512  # two K-quant super-blocks per row
QUANTIZABLE = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "BF16", "F16", "F32")  # gguf-py quantizes these
HAND_PACKED = ("Q4_K", "Q5_K", "Q6_K")  # gguf-py only de-quantizes these: random codes, sane scales


def _k_quant_bytes(name: str, rng: np.random.Generator) -> np.ndarray:
    """Random K-quant blocks whose float16 scales are finite and of a realistic size."""
    qtype = GGMLQuantizationType[name]
    block, size = quants.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(ROWS, COLS // block, size), dtype=np.uint8)

    def scales() -> np.ndarray:
        values = rng.uniform(1e-4, 2e-2, size=(ROWS, COLS // block)).astype(np.float16)
        return values.view(np.uint8).reshape(ROWS, -1, 2)

    if name == "Q6_K":
        raw[..., 208:210] = scales()
    else:
        raw[..., 0:2] = scales()
        raw[..., 2:4] = scales()
    return raw.reshape(ROWS, -1)


def _write(path: Path, tensors: dict[str, tuple[np.ndarray, GGMLQuantizationType]]) -> None:
    writer = GGUFWriter(str(path), "llama")
    writer.add_string("tokenizer.chat_template", "{{ messages[0]['content'] }}")
    writer.add_array("tokenizer.ggml.tokens", ["a", "b", "<s>"])
    for name, (data, qtype) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(7)
    tensors: dict[str, tuple[np.ndarray, GGMLQuantizationType]] = {}
    for name in QUANTIZABLE:
        qtype = GGMLQuantizationType[name]
        weights = rng.normal(0, 0.05, size=(ROWS, COLS)).astype(np.float32)
        tensors[f"{name}.weight"] = (quants.quantize(weights, qtype), qtype)
    for name in HAND_PACKED:
        tensors[f"{name}.weight"] = (_k_quant_bytes(name, rng), GGMLQuantizationType[name])
    path = tmp_path_factory.mktemp("gguf") / "blocks.gguf"
    _write(path, tensors)
    return path


@pytest.mark.parametrize("type_name", QUANTIZABLE + HAND_PACKED)
def test_every_block_type_reads_back_exactly(written: Path, type_name: str) -> None:
    reference_reader = GGUFReader(str(written))
    (stored,) = [t for t in reference_reader.tensors if t.name == f"{type_name}.weight"]
    reference = quants.dequantize(np.asarray(stored.data), stored.tensor_type).reshape(ROWS, COLS)
    ours = read_gguf(written)
    info = ours.tensors[f"{type_name}.weight"]
    assert info.type_name == type_name and info.shape == (ROWS, COLS)
    values = dequantize(ours.raw(info.name), type_name, info.shape)
    assert values.dtype == torch.float32
    np.testing.assert_array_equal(values.numpy(), reference.astype(np.float32))


@pytest.mark.parametrize("type_name", FOUR_BIT + EIGHT_BIT + ("Q5_0", "Q5_1"))
def test_blocks_hold_codes_in_their_kernel_range(written: Path, type_name: str) -> None:
    ours = read_gguf(written)
    info = ours.tensors[f"{type_name}.weight"]
    blocks = unpack(ours.raw(info.name), type_name, (ROWS, COLS))
    limit = 16 if type_name in FOUR_BIT else 256
    assert blocks.q.dtype == torch.uint8 and int(blocks.q.max()) < limit
    assert blocks.bits == (4 if type_name in FOUR_BIT else 8)
    if blocks.bits == 4:  # the Q4 kernel's groups of 32 lose nothing
        q, d, m = four_bit_groups(blocks)
        again = (q.float().reshape(ROWS, -1, 32) * d[..., None] + m[..., None]).reshape(ROWS, COLS)
        torch.testing.assert_close(again, blocks.dequantize(), rtol=0, atol=0)


def test_metadata_and_strings_are_read(written: Path) -> None:
    ours = read_gguf(written)
    assert ours.get("general.architecture") == "llama"
    assert ours.get("tokenizer.chat_template") == "{{ messages[0]['content'] }}"
    assert ours.get("tokenizer.ggml.tokens") == ["a", "b", "<s>"]


def test_unknown_types_are_refused_by_name() -> None:
    with pytest.raises(UnsupportedBlockType, match="Q2_K"):
        unpack(np.zeros((1, 84), dtype=np.uint8), "Q2_K", (1, 256))


def test_truncated_and_foreign_files_are_refused(written: Path, tmp_path: Path) -> None:
    data = written.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(GGUFError, match=r"past the end|truncated"):
        read_gguf(cut)
    foreign = tmp_path / "foreign.gguf"
    foreign.write_bytes(b"PK\x03\x04" + data[4:])
    with pytest.raises(GGUFError, match="not a GGUF file"):
        read_gguf(foreign)
    huge = tmp_path / "huge.gguf"  # a header claiming 2**60 metadata entries must not allocate for them
    huge.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (0).to_bytes(8, "little") + (1 << 60).to_bytes(8, "little"))
    with pytest.raises(GGUFError, match="cannot fit"):
        read_gguf(huge)


def test_q8_0_values_straight_equal_the_blocks_values_bit_for_bit() -> None:
    """The start-up's direct Q8_0 path (d * q) against the blocks' d * (q + 128) - 128 d, over every code
    (-128 included) and scales across float16's range, subnormals too."""
    rng = np.random.default_rng(8)
    rows, blocks = 64, 16
    codes = rng.integers(0, 256, size=(rows, blocks, 32), dtype=np.uint8)
    codes[0, 0, :] = np.arange(0, 256, 8, dtype=np.uint8)  # includes 0x80 = -128
    scales = np.exp2(rng.uniform(-24, 15, size=(rows, blocks, 1))).astype(np.float16)
    raw = np.concatenate([scales.view(np.uint8), codes], axis=-1).reshape(rows, -1)
    straight = dequantize(raw, "Q8_0", (rows, blocks * 32))
    via_blocks = unpack(raw, "Q8_0", (rows, blocks * 32)).dequantize()
    assert torch.equal(straight, via_blocks)
    assert torch.equal(straight, dequantize_rows(raw, "Q8_0", (rows, blocks * 32), torch.float32, chunk=7))
