"""How PyTorch's OpenMP threads wait between parallel regions: a short spin, then sleep.

The model step runs on PyTorch's OpenMP team (libgomp; fused.c's loops share it). After each parallel
region libgomp's threads spin before they sleep: 300,000 pause instructions by default, ~10-40 ms on a
current x86 CPU. Between two decode steps (sampling, text, admitting requests: a few ms) the team then
keeps every core busy doing nothing, and the event loop — /health, new requests, streamed tokens —
waits for a core; on a machine whose cores other processes also want, every barrier spins while the
thread it waits for is descheduled. A spin of 1,000 (libgomp's own figure for a team larger than the
machine) keeps the team awake across the back-to-back regions of one step (microseconds apart) and
puts it to sleep within tens of microseconds after the step (docs/performance.md has the measurements).

libgomp reads its environment once, when it is loaded (with ``import torch``), so this cannot wait for
the settings in the lifespan: ``textgen/__init__.py`` applies it, before any module of the package
imports torch. An operator's own ``GOMP_SPINCOUNT`` or ``OMP_WAIT_POLICY`` wins.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

SPIN_COUNT = "1000"
OPERATOR_CHOICES = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")


def default_spin_count(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Set GOMP_SPINCOUNT unless the operator chose how OpenMP threads wait; True when it was set here."""
    if any(name in environ for name in OPERATOR_CHOICES):
        return False
    environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    return True
