"""fused.h, the one source of the kernels' signatures and limits: its parser, and that C and Python agree."""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

import pytest

from textgen.engine.core import fused, linear
from textgen.engine.core.fused_header import HEADER, HeaderFormatError, parse_header, read_header

GOOD = """/* a comment */
#ifndef TEXTGEN_FUSED_H
#define TEXTGEN_FUSED_H
#include <stdint.h>
#define MAX_WIDTH 8192 /* trailing comment */
#define FUSED_BAD (-2)
int scale(const uint16_t *x, int64_t rows,
          float eps, int flag, void *out);
void tick(void);
#endif
"""


def test_a_header_in_the_format_is_read_exactly() -> None:
    header = parse_header(GOOD)
    assert header.constants == {"MAX_WIDTH": 8192, "FUSED_BAD": -2}
    scale = header.functions["scale"]
    assert [p.name for p in scale.parameters] == ["x", "rows", "eps", "flag", "out"]
    assert [p.c_type for p in scale.parameters] == ["const uint16_t *", "int64_t", "float", "int", "void *"]
    assert scale.argtypes == [ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_void_p]
    assert scale.restype is ctypes.c_int
    assert header.functions["tick"].parameters == () and header.functions["tick"].restype is None


@pytest.mark.parametrize(
    ("line", "complaint"),
    [
        ("int f(double x);", "not one of"),  # a type the parser does not map
        ("int f(struct thing *x);", "not a parameter"),
        ("int f(uint64_t *x);", "pointer to uint64_t"),
        ("int f(const int x);", "by value"),
        ("long f(int x);", "not a declaration"),
        ("int f(int x)", "text after the last declaration"),  # no semicolon
        ("#define MAX_THING (1 << 4)", "only `#define NAME INTEGER`"),
        ("#define MAX_THING 4.5", "only `#define NAME INTEGER`"),
        ("#if defined(X)", "only `#define NAME INTEGER`"),
        ("#define MAX_WIDTH 1", "defined twice"),
        ("int scale(int x);", "declared twice"),
        ("typedef int thing;", "not a declaration"),
    ],
)
def test_anything_outside_the_format_is_refused_not_guessed(line: str, complaint: str) -> None:
    with pytest.raises(HeaderFormatError, match=re.escape(complaint)):
        parse_header(GOOD.replace("#endif", f"{line}\n#endif"))


def test_fused_c_includes_the_header_and_redefines_nothing_in_it() -> None:
    source = fused.SOURCE.read_text()
    assert '#include "fused.h"' in source
    header = read_header()
    for name in header.constants:
        assert not re.search(rf"#define\s+{name}\b", source), f"{name} is defined again in fused.c"


def test_every_declared_function_is_defined_in_fused_c_with_the_same_parameters() -> None:
    source = " ".join(fused.SOURCE.read_text().split())
    for signature in read_header().functions.values():
        parameters = ", ".join(f"{p.c_type}{p.name}" if p.c_type.endswith("*") else f"{p.c_type} {p.name}"
                               for p in signature.parameters) or "void"
        assert f"{signature.returns} {signature.name}({parameters})" in source, signature.name


def test_python_takes_its_limits_and_signatures_from_the_header() -> None:
    header = read_header()
    assert (
        header.constants["MAX_WIDTH"], header.constants["MAX_HEADS"], header.constants["MAX_DIM"],
        header.constants["MAX_LIVE"],
    ) == (fused.MAX_WIDTH, fused.MAX_HEADS, fused.MAX_DIM, fused.MAX_LIVE)
    assert header.constants["MAX_WIDTH"] == linear.MAX_FUSED_WIDTH
    assert fused.HEADER_PATH == HEADER
    python_source = Path(fused.__file__).read_text()
    assert "argtypes = [" not in python_source and not re.search(r"MAX_\w+\s*=\s*\d", python_source)


def test_the_loaded_library_gets_the_headers_argtypes(tmp_path_factory: pytest.TempPathFactory) -> None:
    kernels = fused.load_fused_kernels(tmp_path_factory.mktemp("header") / "kernels")
    assert kernels is not None
    for signature in read_header().functions.values():
        function = getattr(kernels.library, signature.name)
        assert function.argtypes == signature.argtypes and function.restype is signature.restype
