"""fused.c built with AddressSanitizer and UndefinedBehaviorSanitizer, every kernel exercised on small shapes.

The sanitized library can only be loaded into a process whose first library is libasan, so each run is a
subprocess of ``python -m tests.unit.fused_reference`` with LD_PRELOAD set. A sanitizer report aborts it
(halt_on_error, -fno-sanitize-recover), so reaching the line it prints after exercising every kernel means
no report; the negative control, a real overflow made next in the same run, proves that such a report does
abort it. One run for both: PyTorch's import under ASan is most of a run's cost (~12 s of CPU).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.fused_reference import EXERCISED
from textgen.engine.core.fused import find_compiler

ROOT = Path(__file__).resolve().parents[2]
REPORTS = ("ERROR: AddressSanitizer", "runtime error:", "ERROR: LeakSanitizer")


def libasan() -> str:
    compiler = find_compiler()
    assert compiler is not None, "this test needs a C compiler (gcc)"
    found = subprocess.run(
        [compiler, "-print-file-name=libasan.so"], capture_output=True, text=True, timeout=60, check=True
    ).stdout.strip()
    # gcc prints the bare name back when it has no such file: Debian's gcc depends on libasan (libgcc-*-dev).
    assert os.path.isabs(found) and os.path.exists(found), f"no libasan.so for {compiler}: apt-get install gcc"
    return found


def run_sanitized(folder: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    environment = {
        **os.environ,
        "LD_PRELOAD": libasan(),
        # Python and PyTorch keep memory until exit on purpose: leaks are not what this test looks for.
        "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1:abort_on_error=0:exitcode=86",
        "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1:exitcode=87",
        "OMP_NUM_THREADS": "2",  # the parallel regions run on more than one thread
    }
    return subprocess.run(
        [sys.executable, "-m", "tests.unit.fused_reference", str(folder), *extra],
        capture_output=True, text=True, timeout=240, cwd=ROOT, env=environment,
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sanitized") / "kernels"


@pytest.fixture(scope="module")
def sanitized_run(folder: Path) -> subprocess.CompletedProcess[str]:
    """The sanitized build made in ``folder``, every kernel exercised, then the overflowing call."""
    return run_sanitized(folder, "--overflow")


def test_every_kernel_runs_clean_under_asan_and_ubsan(
    folder: Path, sanitized_run: subprocess.CompletedProcess[str]
) -> None:
    assert EXERCISED in sanitized_run.stdout.splitlines(), sanitized_run.stderr[-4000:]
    # The one report is the negative control's (below), made after every kernel had run.
    assert sanitized_run.stderr.count("ERROR: AddressSanitizer") == 1, sanitized_run.stderr[-4000:]
    assert not any(report in sanitized_run.stderr for report in REPORTS[1:]), sanitized_run.stderr[-4000:]
    assert [path.name.startswith("fused-sanitize-") for path in folder.iterdir()] == [True]


def test_an_overflow_past_the_boundary_checks_is_reported(sanitized_run: subprocess.CompletedProcess[str]) -> None:
    """The negative control: a call straight into C with an output one row short must fail the run."""
    result = sanitized_run
    assert result.returncode == 86, result.stderr[-4000:]
    assert "ERROR: AddressSanitizer: heap-buffer-overflow" in result.stderr
    assert "add_rms_norm" in result.stderr
