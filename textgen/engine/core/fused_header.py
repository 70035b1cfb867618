"""fused.h read by Python: the kernels' signatures (as ctypes types), limits and status codes, from the one
header fused.c includes, so that none of them is written twice.

The parser is small and strict on purpose: the header keeps a deliberately regular format (described at
its top), and anything outside it (a type not in ``ARGUMENT_TYPES``, a macro that is not an integer, a
stray line) raises HeaderFormatError instead of being guessed at. A wrong ctypes signature would pass
garbage to C without a word, so a header this parser cannot read exactly is a build error.
"""

from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

HEADER = Path(__file__).with_name("fused.h")

CType: TypeAlias = type[ctypes.c_int] | type[ctypes.c_int64] | type[ctypes.c_float] | type[ctypes.c_void_p]

# Values cross as these; every pointer (a tensor's data_ptr(), or None for NULL) as a void pointer.
VALUE_TYPES: dict[str, CType] = {"int": ctypes.c_int, "int64_t": ctypes.c_int64, "float": ctypes.c_float}
POINTEE_TYPES = frozenset({"int8_t", "uint8_t", "uint16_t", "int32_t", "int64_t", "float", "void"})
RETURN_TYPES = frozenset({"int", "void"})

_COMMENT = re.compile(r"/\*.*?\*/", re.DOTALL)
_DEFINE = re.compile(r"#define\s+([A-Z][A-Z0-9_]*)\s+(-?\d+|\(-\d+\))")
_GUARD = re.compile(r"#(ifndef|define)\s+TEXTGEN_FUSED_H|#endif|#include\s+<stdint\.h>")
_DECLARATION = re.compile(r"(int|void)\s+([a-z_][a-z0-9_]*)\s*\(([^()]*)\)")
_PARAMETER = re.compile(r"(const\s+)?([a-z0-9_]+)\s*(\*?)\s*([a-z_][a-z0-9_]*)")


class HeaderFormatError(ValueError):
    """fused.h has something its deliberately regular format does not allow (the message says what)."""


@dataclass(frozen=True)
class Parameter:
    name: str
    c_type: str  # as written, e.g. "const uint16_t *"
    ctype: CType


@dataclass(frozen=True)
class Signature:
    name: str
    returns: str  # "int" (a FUSED_* status, or a flag) or "void"
    parameters: tuple[Parameter, ...]

    @property
    def argtypes(self) -> list[CType]:
        return [parameter.ctype for parameter in self.parameters]

    @property
    def restype(self) -> type[ctypes.c_int] | None:
        return ctypes.c_int if self.returns == "int" else None


@dataclass(frozen=True)
class Header:
    constants: dict[str, int]  # MAX_* limits and FUSED_* status codes
    functions: dict[str, Signature]

    def constant(self, name: str) -> int:
        if name not in self.constants:
            raise HeaderFormatError(f"fused.h defines no {name}")
        return self.constants[name]


def parse_header(text: str) -> Header:
    """The constants and declarations of a header in fused.h's format; HeaderFormatError on anything else."""
    constants: dict[str, int] = {}
    code: list[str] = []
    for number, line in enumerate(_COMMENT.sub(" ", text).splitlines(), start=1):
        stripped = line.strip()
        if not stripped or _GUARD.fullmatch(stripped):
            continue
        if stripped.startswith("#"):
            define = _DEFINE.fullmatch(stripped)
            if define is None:
                raise HeaderFormatError(f"line {number}: only `#define NAME INTEGER` is allowed, not {stripped!r}")
            name, value = define.groups()
            if name in constants:
                raise HeaderFormatError(f"line {number}: {name} is defined twice")
            constants[name] = int(value.strip("()"))
            continue
        code.append(stripped)
    functions: dict[str, Signature] = {}
    *declarations, rest = " ".join(code).split(";")
    if rest.strip():
        raise HeaderFormatError(f"text after the last declaration: {rest.strip()!r}")
    for declaration in declarations:
        signature = _parse_declaration(" ".join(declaration.split()))
        if signature.name in functions:
            raise HeaderFormatError(f"{signature.name} is declared twice")
        functions[signature.name] = signature
    return Header(constants, functions)


def _parse_declaration(text: str) -> Signature:
    match = _DECLARATION.fullmatch(text)
    if match is None:
        raise HeaderFormatError(f"not a declaration `int|void name(type name, ...)`: {text!r}")
    returns, name, arguments = match.groups()
    if arguments.strip() == "void":
        return Signature(name, returns, ())
    return Signature(name, returns, tuple(_parse_parameter(name, part.strip()) for part in arguments.split(",")))


def _parse_parameter(function: str, text: str) -> Parameter:
    match = _PARAMETER.fullmatch(text)
    if match is None:
        raise HeaderFormatError(f"{function}: not a parameter `[const] type [*]name`: {text!r}")
    const, base, pointer, name = match.groups()
    if pointer:
        if base not in POINTEE_TYPES:
            raise HeaderFormatError(f"{function}({name}): pointer to {base} is not one of {sorted(POINTEE_TYPES)}")
        return Parameter(name, f"{const or ''}{base} *", ctypes.c_void_p)
    if const or base not in VALUE_TYPES:
        raise HeaderFormatError(f"{function}({name}): {text!r} is not one of {sorted(VALUE_TYPES)} by value")
    return Parameter(name, base, VALUE_TYPES[base])


def read_header(path: Path = HEADER) -> Header:
    return parse_header(path.read_text())
