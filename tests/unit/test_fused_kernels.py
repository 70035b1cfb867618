"""fused.c's kernels one by one: attention at head size 64 with 1-4 query heads per KV head against PyTorch, the
scalar build (no AVX-512) against the same references, the checks at the boundary (Python) and fused.c's own
guards, and the build at set-up (python -m textgen.engine.core.build)."""

from __future__ import annotations

import ctypes
import logging
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.unit import fused_reference as reference
from textgen.engine.core import build as build_module
from textgen.engine.core import fused
from textgen.engine.core.fused import SCALAR, FusedArgumentError, FusedKernels, build_fused_kernels, read_header

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", params=["native", "scalar"])
def kernels(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> FusedKernels:
    variant = fused.VARIANTS[request.param]
    built = build_fused_kernels(tmp_path_factory.mktemp(request.param) / "kernels", variant, at_setup=True)
    assert built.kernels is not None, built.problem
    return built.kernels


@pytest.mark.parametrize("group", [1, 2, 3, 4])
def test_attention_at_head_size_64_matches_pytorch_for_1_to_4_query_heads_per_kv_head(
    kernels: FusedKernels, group: int
) -> None:
    """The head-size-64 path (weighted_values_64, unrolled per group size in the native build; the plain loops
    in the scalar one): a prompt prefilled causally in one cache row while two others decode."""
    reference.check_attention(kernels, heads=2 * group, kv_heads=2)


def test_every_kernel_matches_its_reference_on_small_shapes(kernels: FusedKernels) -> None:
    reference.exercise(kernels)


def test_the_scalar_build_has_no_avx512_paths(tmp_path: Path) -> None:
    built = build_fused_kernels(tmp_path / "kernels", SCALAR, at_setup=True)
    assert built.kernels is not None, built.problem
    assert not built.kernels.q4_supported  # its AVX-512 VNNI product is compiled out
    (library,) = (tmp_path / "kernels").iterdir()
    assert library.name.startswith("fused-scalar-")
    assert "-mno-avx512f" in SCALAR.compile_flags


# ----- the boundary ------------------------------------------------------------------------------------


def attention_call(kernels: FusedKernels, case: reference.AttentionCase, **changes: object) -> None:
    arguments: dict[str, object] = {
        "qkv": case.qkv, "cos": case.cos, "sin": case.sin, "positions": case.positions,
        "cache_rows": case.cache_rows, "keys": case.keys, "values": case.values,
        "out": torch.empty(case.qkv.shape[0], case.heads * case.dim, dtype=torch.bfloat16),
        "heads": case.heads, "scale": case.scale,
    }
    arguments.update(changes)
    kernels.rotary_cache_attention(**arguments)  # type: ignore[arg-type]


BAD_ATTENTION: dict[str, tuple[Callable[[reference.AttentionCase], dict[str, object]], str]] = {
    "qkv float32": (lambda c: {"qkv": c.qkv.float()}, "qkv is torch.float32, expected torch.bfloat16"),
    "qkv strided": (lambda c: {"qkv": c.qkv.t().contiguous().t()}, "qkv is not contiguous"),
    "qkv on meta": (lambda c: {"qkv": c.qkv.to("meta")}, "qkv is on meta"),
    "qkv too narrow": (lambda c: {"qkv": c.qkv[:, :-64].contiguous()}, "qkv has shape"),
    "positions int32": (lambda c: {"positions": c.positions.int()}, "positions is torch.int32"),
    "positions short": (lambda c: {"positions": c.positions[:-1]}, "positions has shape"),
    "cache rows float": (lambda c: {"cache_rows": c.cache_rows.float()}, "cache_rows is torch.float32"),
    "values other shape": (lambda c: {"values": c.values[:2].contiguous()}, "values has shape"),
    "cos of another head size": (lambda c: {"cos": c.cos[:, :32].contiguous()}, "cos has shape"),
    "sin shorter than cos": (lambda c: {"sin": c.sin[:10]}, "sin has shape"),
    "out too small": (lambda c: {"out": torch.empty(2, 64, dtype=torch.bfloat16)}, "out has shape"),
    "no query heads": (lambda c: {"heads": 0}, "both must be > 0"),
    "heads not a multiple": (lambda c: {"heads": 3}, "a multiple of the KV heads"),
    "no kv heads": (lambda c: {"keys": c.keys[:, :0].contiguous()}, "both must be > 0"),
}


@pytest.mark.parametrize("name", sorted(BAD_ATTENTION))
def test_attention_refuses_what_python_can_see_before_any_c_runs(kernels: FusedKernels, name: str) -> None:
    change, message = BAD_ATTENTION[name]
    case = reference.attention_case(4, 2)
    keys_before = case.keys.clone()
    with pytest.raises(FusedArgumentError, match=re.escape(message)):
        attention_call(kernels, case, **change(case))
    assert torch.equal(case.keys, keys_before)  # nothing was written


@pytest.mark.parametrize(
    ("field", "index", "value"),
    [("cache_rows", 0, 3), ("cache_rows", 4, -1), ("positions", 0, 48), ("positions", 3, -1)],
)
def test_cache_rows_and_positions_outside_the_cache_are_refused_by_fused_c(
    kernels: FusedKernels, field: str, index: int, value: int
) -> None:
    """Values Python would have to read (an operator per call) are checked in C before anything is written."""
    case = reference.attention_case(4, 2)
    getattr(case, field)[index] = value
    keys_before, values_before = case.keys.clone(), case.values.clone()
    with pytest.raises(FusedArgumentError, match="a position, cache row or outlier index outside its tensor"):
        attention_call(kernels, case)
    assert torch.equal(case.keys, keys_before) and torch.equal(case.values, values_before)


def test_a_position_past_the_rotary_tables_is_refused(kernels: FusedKernels) -> None:
    case = reference.attention_case(4, 2)
    with pytest.raises(FusedArgumentError, match="outside its tensor"):
        attention_call(kernels, case, cos=case.cos[:30].contiguous(), sin=case.sin[:30].contiguous())


def test_fused_c_guards_zero_kv_heads_itself(kernels: FusedKernels) -> None:
    """Called past the Python checks, kv_heads = 0 returns FUSED_BAD_SHAPE instead of dividing by zero."""
    case = reference.attention_case(2, 1)
    out = torch.empty(case.qkv.shape[0], 2 * 64, dtype=torch.bfloat16)
    tables = torch.arange(3)[:, None]
    status = kernels.library.rotary_cache_attention(
        case.qkv.data_ptr(), case.cos.data_ptr(), case.sin.data_ptr(), case.cos.shape[0], case.positions.data_ptr(),
        case.cache_rows.data_ptr(), tables.data_ptr(), case.keys.data_ptr(), case.values.data_ptr(), out.data_ptr(),
        case.qkv.shape[0], 2, 0, 64, 3, 48, 3, 1, 0.125,
    )
    assert status == read_header().constants["FUSED_BAD_SHAPE"]


@pytest.mark.parametrize("bad", [[3, 96], [-1], [200]])
def test_outlier_indices_outside_the_row_are_refused(kernels: FusedKernels, bad: list[int]) -> None:
    x = torch.randn(2, 96)
    with pytest.raises(FusedArgumentError, match="outlier index outside its tensor"):
        kernels.quantize_rows(x, torch.tensor(bad))
    layer = reference._Layer(torch.rand(96), torch.tensor(bad), torch.randn(len(bad), 96), None)
    with pytest.raises(FusedArgumentError, match="outlier index outside its tensor"):
        kernels.residual_norm_quantize(x.bfloat16(), None, torch.ones(96, dtype=torch.bfloat16), 1e-5, layer)


def test_the_other_kernels_check_dtype_layout_and_shape(kernels: FusedKernels) -> None:
    x = torch.randn(3, 64).bfloat16()
    weight, out = torch.ones(64, dtype=torch.bfloat16), torch.empty(3, 64, dtype=torch.bfloat16)
    with pytest.raises(FusedArgumentError, match="weight has shape"):
        kernels.add_rms_norm(x, None, weight[:32], out, 1e-5)
    with pytest.raises(FusedArgumentError, match="out has shape"):
        kernels.add_rms_norm(x, None, weight, out[:2], 1e-5)
    with pytest.raises(FusedArgumentError, match=re.escape("delta is torch.float32")):
        kernels.add_rms_norm(x, x.float(), weight, out, 1e-5)
    with pytest.raises(FusedArgumentError, match="gate_up has shape"):
        kernels.silu_mul(x, torch.empty(3, 64, dtype=torch.bfloat16))
    with pytest.raises(FusedArgumentError, match=re.escape("x is torch.float16")):
        kernels.quantize_rows(x.half(), torch.tensor([1]))
    with pytest.raises(FusedArgumentError, match=re.escape("outliers is torch.int32")):
        kernels.quantize_rows(x, torch.tensor([1], dtype=torch.int32))
    with pytest.raises(FusedArgumentError, match=re.escape("x is not contiguous")):
        kernels.quantize_rows(torch.randn(64, 3).t(), torch.tensor([1]))
    acc = torch.zeros(3, 64, dtype=torch.int32)
    with pytest.raises(FusedArgumentError, match="row_max has shape"):
        kernels.dequantize_rows(acc, torch.ones(2, 1), torch.ones(64), torch.ones(3, 0), torch.ones(0, 64), None,
                                torch.float32)
    with pytest.raises(FusedArgumentError, match=re.escape("out_dtype torch.float16")):
        kernels.dequantize_rows(acc, torch.ones(3, 1), torch.ones(64), torch.ones(3, 0), torch.ones(0, 64), None,
                                torch.float16)
    with pytest.raises(FusedArgumentError, match="temperature has shape"):
        kernels.sample_nucleus(torch.randn(3, 50), torch.ones(2), torch.ones(3), torch.rand(3, 4))
    with pytest.raises(FusedArgumentError, match=re.escape("logits is torch.float64")):
        kernels.sample_nucleus(torch.randn(3, 50, dtype=torch.float64), torch.ones(3), torch.ones(3), torch.rand(3, 4))


def test_the_library_refuses_oversized_shapes_itself(kernels: FusedKernels) -> None:
    x = torch.zeros(1, fused.MAX_WIDTH + 64, dtype=torch.bfloat16)
    weight = torch.ones(fused.MAX_WIDTH + 64, dtype=torch.bfloat16)
    with pytest.raises(FusedArgumentError, match=re.escape("beyond the limits of fused.h")):
        kernels.add_rms_norm(x, None, weight, torch.empty_like(x), 1e-5)


# ----- built at set-up ---------------------------------------------------------------------------------


def test_the_setup_command_builds_what_the_server_then_only_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "cache" / "textgen" / "kernels"
    with caplog.at_level(logging.INFO):
        assert build_module.main(["--folder", str(folder)]) == 0
    (library,) = folder.iterdir()
    assert library.name == f"fused-{fused._build_key(fused.find_compiler() or 'cc')}.so"
    assert "not built at set-up" not in caplog.text and "Fused CPU kernels ready" in caplog.text
    caplog.clear()

    def no_compiling(*_: object) -> None:
        raise AssertionError("the server compiled although set-up had built the library")

    monkeypatch.setattr(fused, "_compile", no_compiling)
    fused._load.cache_clear()  # a new server process
    with caplog.at_level(logging.INFO):
        assert build_fused_kernels(folder).kernels is not None
    assert caplog.text == ""


def test_a_server_without_a_prebuilt_library_builds_it_and_says_so_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "kernels"
    with caplog.at_level(logging.WARNING):
        first, second = build_fused_kernels(folder), build_fused_kernels(folder)
    assert first.kernels is not None and second.kernels is first.kernels
    assert caplog.text.count("not built at set-up") == 1 and "make setup" in caplog.text


def test_the_setup_command_without_a_compiler_warns_and_succeeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr("shutil.which", lambda name: None)
    with caplog.at_level(logging.WARNING):
        assert build_module.main(["--folder", str(tmp_path / "kernels")]) == 0
    assert "PyTorch paths" in caplog.text and "install gcc" in caplog.text


def test_the_setup_command_fails_when_a_compiler_cannot_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CC", str(tmp_path / "broken-cc"))
    (tmp_path / "broken-cc").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "broken-cc").chmod(0o755)
    with caplog.at_level(logging.ERROR):
        assert build_module.main(["--folder", str(tmp_path / "kernels")]) == 1
    assert "the build failed" in caplog.text


def test_make_setup_runs_the_kernel_build() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^setup:.*\bkernels\b", makefile, re.MULTILINE)
    assert re.search(r"^kernels:.*\n\t\$\(PY\) -m textgen\.engine\.core\.build$", makefile, re.MULTILINE)
    assert re.search(r"^(run|test): .*setup", makefile, re.MULTILINE)


def test_the_library_is_rebuilt_when_the_header_changes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    compiler = fused.find_compiler()
    assert compiler is not None
    before = fused._build_key(compiler)
    changed = tmp_path / "fused.h"
    changed.write_text(fused.HEADER_PATH.read_text() + "\n")
    monkeypatch.setattr(fused, "HEADER_PATH", changed)
    assert fused._build_key(compiler) != before


def test_ctypes_sees_int_status_returns(kernels: FusedKernels) -> None:
    assert kernels.library.add_rms_norm.restype is ctypes.c_int and kernels.library.silu_mul.restype is None


@pytest.mark.parametrize("outliers", [[-1], [96], [3, 200]])
def test_layers_with_outlier_channels_outside_the_input_are_refused_when_built(
    kernels: FusedKernels, outliers: list[int]
) -> None:
    from textgen.engine.core.linear import Q4Kernel, W8A8Kernel

    weight = torch.randn(32, 96)
    with pytest.raises(ValueError, match=re.escape("must be a list of input channels 0..95")):
        W8A8Kernel.quantize(weight, None, torch.tensor(outliers), kernels, torch.float32, torch.float32)
    q, scales = torch.randint(0, 16, (32, 96)), torch.full((32, 3), 0.01)
    with pytest.raises(ValueError, match=re.escape("must be a list of input channels 0..95")):
        Q4Kernel.pack(q, scales, -scales, None, torch.tensor(outliers), kernels)


def test_a_model_with_more_query_heads_per_kv_head_than_fused_c_takes_is_not_run_fused() -> None:
    from types import SimpleNamespace

    from textgen.engine.core import llama

    def weights(heads: int, kv_heads: int) -> object:
        embed = torch.zeros(4, 64, dtype=torch.bfloat16)
        layer = SimpleNamespace(down=SimpleNamespace(in_features=128))
        return SimpleNamespace(embed=embed, heads=heads, kv_heads=kv_heads, head_dim=64, layers=[layer])

    assert llama.fused_supported(weights(8, 1), 1, 10)  # type: ignore[arg-type]
    assert not llama.fused_supported(weights(9 * 2, 2), 1, 10)  # type: ignore[arg-type]


def test_a_constant_checked_once_is_checked_again_under_another_expectation(kernels: FusedKernels) -> None:
    """Layer constants are recognised after their first full check, but only for the same expectation: the
    same weight handed to a call of another width is refused."""
    x = torch.randn(2, 64).bfloat16()
    weight = torch.ones(64, dtype=torch.bfloat16)
    kernels.add_rms_norm(x, None, weight, torch.empty_like(x), 1e-5)
    wider = torch.randn(2, 128).bfloat16()
    with pytest.raises(FusedArgumentError, match="weight has shape"):
        kernels.add_rms_norm(wider, None, weight, torch.empty_like(wider), 1e-5)
