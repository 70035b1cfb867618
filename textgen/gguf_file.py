"""A GGUF file's metadata and tensors, read directly and fast.

gguf-py's ``GGUFReader`` builds a numpy view per element of every metadata array; a 262k-token
vocabulary (Gemma 3) then takes tens of seconds to open. This reader parses the header with ``struct``
(string arrays become Python lists, numeric arrays one ``numpy`` array each) and maps the tensor data
without copying it: a tensor is a read-only ``numpy`` view of the file's bytes, in its stored block format.

Format (version 2 and 3): magic ``GGUF``, version, tensor count, metadata count; metadata as (key, type,
value); tensor infos as (name, dimensions fastest first, type, offset); data aligned to
``general.alignment`` (32 by default). Every count and length is checked against the file's size before
it is used, so a truncated or hostile file raises ``GGUFError`` instead of allocating or reading wildly.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
MAX_NAME = 1 << 16  # bytes in a key or tensor name

# metadata value types
_SCALARS: dict[int, tuple[str, int]] = {
    0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
    6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8),
}  # fmt: skip
_NUMPY: dict[int, str] = {
    0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8",
}  # fmt: skip
_STRING, _ARRAY = 8, 9

# ggml tensor types: id -> (name, weights per block, bytes per block)
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    30: ("BF16", 1, 2),
}


class GGUFError(ValueError):
    """The file is not a GGUF file this reader understands (the message says what and where)."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # PyTorch order: slowest dimension first ([out, in] for a weight)
    type_id: int
    offset: int  # from the start of the file

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.type_id][0] if self.type_id in GGML_TYPES else f"type {self.type_id}"

    @property
    def elements(self) -> int:
        count = 1
        for n in self.shape:
            count *= n
        return count

    @property
    def nbytes(self) -> int:
        _, block, size = GGML_TYPES[self.type_id]
        return self.elements // block * size


@dataclass
class GGUFFile:
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    _buffer: mmap.mmap | None = field(default=None, repr=False)

    def raw(self, name: str) -> np.ndarray:
        """A tensor's stored bytes, as a read-only uint8 view of the mapped file: [rows, bytes per row]."""
        info = self.tensors[name]
        assert self._buffer is not None
        flat = np.frombuffer(self._buffer, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        rows = info.elements // info.shape[-1] if info.shape else 1
        return flat.reshape(rows, info.nbytes // rows)

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def close(self) -> None:
        if self._buffer is not None:
            self._buffer.close()
            self._buffer = None


class _Cursor:
    def __init__(self, data: mmap.mmap) -> None:
        self.data, self.at, self.size = data, 0, len(data)

    def need(self, count: int, what: str) -> None:
        if count < 0 or self.at + count > self.size:
            raise GGUFError(f"truncated GGUF file: {what} at byte {self.at} needs {count} bytes past the end")

    def scalar(self, fmt: str, size: int, what: str) -> Any:
        self.need(size, what)
        (value,) = struct.unpack_from(fmt, self.data, self.at)
        self.at += size
        return value

    def u32(self, what: str) -> int:
        return int(self.scalar("<I", 4, what))

    def u64(self, what: str) -> int:
        return int(self.scalar("<Q", 8, what))

    def string(self, what: str, limit: int | None = None) -> str:
        length = self.u64(what)
        if limit is not None and length > limit:
            raise GGUFError(f"{what} is {length} bytes long (at most {limit})")
        self.need(length, what)
        text = bytes(self.data[self.at : self.at + length]).decode("utf-8", errors="replace")
        self.at += length
        return text

    def strings(self, count: int, what: str) -> list[str]:
        # Each string is at least its 8-byte length: refuse counts the rest of the file cannot hold.
        self.need(8 * count, what)
        data, at, out = self.data, self.at, []
        unpack = struct.Struct("<Q").unpack_from
        for _ in range(count):
            (length,) = unpack(data, at)
            at += 8
            if at + length > self.size:
                self.at = at
                self.need(length, what)
            out.append(data[at : at + length].decode("utf-8", errors="replace"))
            at += length
        self.at = at
        return out

    def value(self, kind: int, what: str) -> Any:
        if kind in _SCALARS:
            return self.scalar(*_SCALARS[kind], what)
        if kind == _STRING:
            return self.string(what)
        if kind == _ARRAY:
            item, count = self.u32(what), self.u64(what)
            if item in _NUMPY:
                width = np.dtype(_NUMPY[item]).itemsize
                self.need(count * width, what)
                array = np.frombuffer(self.data, dtype=_NUMPY[item], count=count, offset=self.at).copy()
                self.at += count * width
                return array.astype(bool) if item == 7 else array
            if item == _STRING:
                return self.strings(count, what)
            if item == _ARRAY:
                self.need(12 * count, what)
                return [self.value(_ARRAY, what) for _ in range(count)]
            raise GGUFError(f"{what}: unknown array item type {item}")
        raise GGUFError(f"{what}: unknown metadata type {kind}")


def read_architecture(path: Path) -> str | None:
    """``general.architecture`` alone, reading no further than that entry (llama.cpp writes it first), so
    deciding how to load a file costs nothing; None for a file that is not GGUF or does not say."""
    try:
        with open(path, "rb") as handle:
            buffer = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):
        return None
    try:
        cursor = _Cursor(buffer)
        if bytes(buffer[:4]) != MAGIC:
            return None
        cursor.at = 4
        if cursor.u32("version") not in (2, 3):
            return None
        cursor.u64("tensor count")
        for _ in range(cursor.u64("metadata count")):
            key = cursor.string("metadata key", MAX_NAME)
            value = cursor.value(cursor.u32(key), key)
            if key == "general.architecture":
                return str(value)
        return None
    except (GGUFError, struct.error, UnicodeDecodeError, OverflowError):
        return None
    finally:
        buffer.close()


def read_gguf(path: Path) -> GGUFFile:
    """Parse a GGUF file's header and map its tensor data; raises GGUFError for anything malformed."""
    with open(path, "rb") as handle:
        try:
            buffer = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError as error:  # an empty file
            raise GGUFError(f"{path} is empty, not a GGUF file") from error
    try:
        return _parse(path, buffer)
    except GGUFError:
        buffer.close()
        raise
    except (struct.error, UnicodeDecodeError, OverflowError) as error:
        buffer.close()
        raise GGUFError(f"{path}: malformed GGUF header ({error})") from error


def _parse(path: Path, buffer: mmap.mmap) -> GGUFFile:
    cursor = _Cursor(buffer)
    cursor.need(4, "magic")
    if buffer[:4] != MAGIC:
        raise GGUFError(f"{path} is not a GGUF file (it starts with {bytes(buffer[:4])!r}, not b'GGUF')")
    cursor.at = 4
    version = cursor.u32("version")
    if version not in (2, 3):
        raise GGUFError(f"{path} is GGUF version {version}; this reader understands versions 2 and 3")
    tensor_count, kv_count = cursor.u64("tensor count"), cursor.u64("metadata count")
    if tensor_count > cursor.size // 24 or kv_count > cursor.size // 12:
        raise GGUFError(f"{path}: {tensor_count} tensors / {kv_count} metadata entries cannot fit in the file")
    metadata: dict[str, Any] = {}
    for _ in range(kv_count):
        key = cursor.string("metadata key", MAX_NAME)
        metadata[key] = cursor.value(cursor.u32(key), key)
    infos = []
    for _ in range(tensor_count):
        name = cursor.string("tensor name", MAX_NAME)
        dims = cursor.u32(name)
        if not 0 < dims <= MAX_DIMS:
            raise GGUFError(f"tensor {name} has {dims} dimensions (1 to {MAX_DIMS} are valid)")
        shape = tuple(cursor.u64(name) for _ in range(dims))
        kind, offset = cursor.u32(name), cursor.u64(name)
        infos.append((name, tuple(reversed(shape)), kind, offset))
    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    if alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(f"{path}: general.alignment {alignment} is not a power of two")
    start = -(-cursor.at // alignment) * alignment
    tensors: dict[str, TensorInfo] = {}
    for name, shape, kind, offset in infos:
        info = TensorInfo(name, shape, kind, start + offset)
        if kind not in GGML_TYPES:
            raise GGUFError(f"tensor {name} has unknown ggml type {kind}")
        block = GGML_TYPES[kind][1]
        if any(n <= 0 for n in shape) or shape[-1] % block:
            raise GGUFError(
                f"tensor {name} of type {info.type_name} has shape {list(shape)} (rows must be whole blocks of {block})"
            )
        if info.offset + info.nbytes > cursor.size:
            raise GGUFError(f"tensor {name} lies past the end of {path} (truncated file?)")
        if name in tensors:
            raise GGUFError(f"{path} holds tensor {name} twice")
        tensors[name] = info
    return GGUFFile(path, version, metadata, tensors, buffer)
