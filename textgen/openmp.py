"""How PyTorch's OpenMP threads wait between parallel regions: a short spin, then sleep.

The model step runs on PyTorch's OpenMP team (libgomp; fused.c's loops share it). After each parallel
region libgomp's threads spin before they sleep: 300,000 pause instructions by default, ~10-40 ms on a
current x86 CPU. Between two decode steps (sampling, text, admitting requests: a few ms) the team then
keeps every core busy doing nothing, and the event loop — /health, new requests, streamed tokens —
waits for a core; on a machine whose cores other processes also want, every barrier spins while the
thread it waits for is descheduled. A spin of 1,000 (libgomp's own figure for a team larger than the
machine) keeps the team awake across the back-to-back regions of one step (microseconds apart) and
puts it to sleep within tens of microseconds after the step (docs/performance.md has the measurements).

The same spin must hold when the process has more OpenMP threads than cores, which several engines in
one process (several models, each engine thread with its own team) always have: libgomp then uses a
"throttled" spin instead, 100 unless ``OMP_WAIT_POLICY=ACTIVE``, where it is 1,000 (capped by
``GOMP_SPINCOUNT``). At 100 a busy engine's threads would sleep between the regions of every step (an
idle engine's mere presence slowing it down), so the policy is set to ACTIVE too: with the explicit spin
count libgomp uses no other effect of it, and both spins are 1,000.

libgomp reads its environment once, when it is loaded (with ``import torch``), so this cannot wait for
the settings in the lifespan: ``textgen/__init__.py`` applies it, before any module of the package
imports torch. An operator's own ``GOMP_SPINCOUNT`` or ``OMP_WAIT_POLICY`` wins.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

SPIN_COUNT = "1000"
WAIT_POLICY = "ACTIVE"  # with SPIN_COUNT: only makes the throttled spin 1,000 as well
OPERATOR_CHOICES = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")
DEFAULTS = {"GOMP_SPINCOUNT": SPIN_COUNT, "OMP_WAIT_POLICY": WAIT_POLICY}


def default_spin_count(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Set GOMP_SPINCOUNT and OMP_WAIT_POLICY unless the operator chose how OpenMP threads wait; True when
    they were set here."""
    if any(name in environ for name in OPERATOR_CHOICES):
        return False
    environ.update(DEFAULTS)
    if environ is os.environ:
        _applied_here.append(True)
    return True


_applied_here: list[bool] = []  # non-empty once this process's own environment got the defaults


def without_defaults(environ: MutableMapping[str, str], applied: bool | None = None) -> dict[str, str]:
    """``environ`` less the values this module set (``applied``: default, whether it set them in this
    process), for a child process with another OpenMP runtime (LLVM's reads ACTIVE as "spin forever");
    an operator's own values stay."""
    if not (bool(_applied_here) if applied is None else applied):
        return dict(environ)
    return {name: value for name, value in environ.items() if DEFAULTS.get(name) != value}
