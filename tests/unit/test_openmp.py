"""PyTorch's OpenMP threads sleep soon after a step (textgen/openmp.py): the default is in place before
libgomp loads, and an operator's choice wins. (What it does to /health and throughput is measured in
docs/performance.md with bench/health_burst.py, not timed here.)"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from textgen.openmp import DEFAULTS, SPIN_COUNT, default_spin_count, without_defaults

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_the_spin_count_default_leaves_an_operators_choice_alone() -> None:
    empty: dict[str, str] = {}
    assert default_spin_count(empty) and empty == {"GOMP_SPINCOUNT": SPIN_COUNT, "OMP_WAIT_POLICY": "ACTIVE"}
    assert without_defaults({**empty, "PATH": "/bin"}, applied=True) == {"PATH": "/bin"}
    assert without_defaults({**empty, "PATH": "/bin"}, applied=False) == {**empty, "PATH": "/bin"}  # the operator's
    chosen_count = {"GOMP_SPINCOUNT": "50", "PATH": "/bin"}
    assert without_defaults(chosen_count, applied=True) == chosen_count
    assert empty == DEFAULTS
    for chosen in ({"GOMP_SPINCOUNT": "300000"}, {"OMP_WAIT_POLICY": "ACTIVE"}, {"OMP_WAIT_POLICY": "passive"}):
        environ = dict(chosen)
        assert not default_spin_count(environ) and environ == chosen


def test_the_server_sets_it_before_torch_loads_libgomp() -> None:
    """uvicorn main:app imports main; libgomp reads GOMP_SPINCOUNT when ``import torch`` loads it."""
    script = textwrap.dedent(
        """
        import os, sys

        class WatchTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch":  # the first import of torch: what libgomp would read now is all we need,
                    print(os.environ.get("OMP_WAIT_POLICY", "unset"), flush=True)
                    print(os.environ.get("GOMP_SPINCOUNT", "unset"), flush=True)
                    os._exit(0)  # so stop here instead of importing torch and the rest of the app (seconds)
                return None

        sys.meta_path.insert(0, WatchTorch())
        import main  # noqa
        print("torch never imported")
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-2:] == ["ACTIVE", SPIN_COUNT]
