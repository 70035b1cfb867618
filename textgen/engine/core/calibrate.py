"""``TEXTGEN_WEIGHTS=auto``: pick weight formats per batch size by timing this machine's kernels.

The probe is the model's own first layer (every linear in it) plus the output projection, timed in
each candidate format at a few batch sizes; a step's linear time is estimated as layers x probe +
head. For a Q4 GGUF source, the fastest format at batch 1 serves small batches, the fastest at the
largest batch serves large ones, and the crossover is where the large-batch format starts to win; at
most two formats are kept, so memory holds at most two copies of the weights. (A row's logits then
depend slightly on which side of the crossover its batch is: seeded sampling reproduces within a
tier; set TEXTGEN_WEIGHTS to one format for batch-invariant numerics.) A float source keeps its
dtype. The measurement takes a few seconds once per machine and is remembered in the cache folder.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from textgen.engine.core.activations import OUTLIER_CHANNELS
from textgen.engine.core.fused import FusedKernels
from textgen.engine.core.linear import (
    FUSED_DTYPES,
    FloatKernel,
    Int4Kernel,
    Int8Kernel,
    Kernel,
    Q4Kernel,
    W8A8Kernel,
    int4_supported,
    w8a8_supported,
)
from textgen.engine.core.weights import UNBOUNDED, WeightPlan

logger = logging.getLogger(__name__)

PROBE_BATCHES = (1, 4, 8, 16, 32, 64, 128, 256)
REPEATS = 5


@dataclass(frozen=True)
class Probe:
    layer_weights: list[torch.Tensor]  # every [out, in] weight in one transformer layer
    head_weight: torch.Tensor  # [V, E]
    layers: int


def plan_for(
    requested: str,
    *,
    device: torch.device,
    compute_dtype: torch.dtype,
    has_int4_blocks: bool,
    bf16_fast: bool,
    probe: Callable[[], Probe],
    max_batch: int,
    cache_file: Path | None = None,
    fused: FusedKernels | None = None,
) -> tuple[WeightPlan, dict[str, dict[int, float]]]:
    """The plan and, for auto on CPU, the measured ms per step by format and batch size."""
    float_name = str(compute_dtype).removeprefix("torch.")
    if requested == "float":
        return WeightPlan.single(float_name), {}
    if requested == "bf16":
        return WeightPlan.single("bfloat16"), {}
    if requested in ("int8", "w8a8", "int4"):
        return WeightPlan.single(requested), {}
    if device.type != "cpu" or not has_int4_blocks:
        # A float source keeps the model's dtype (TEXTGEN_DTYPE: bf16 where the CPU has bf16 units):
        # one format, so a row's logits never depend on its batch's size, and no measurement.
        return WeightPlan.single(float_name), {}
    candidates = ["int4", "w8a8", "bfloat16", "float32"]
    candidates = [f for f in candidates if (f != "w8a8" or w8a8_supported(device)) and (f != "bfloat16" or bf16_fast)]
    batches = [b for b in PROBE_BATCHES if b <= max(max_batch, 1)] or [1]
    # The Q4 file's own head is 8-bit (see LinearFactory): time the int4 plan with the head it will get.
    heads = {"int4": "w8a8" if w8a8_supported(device) else "int8"}
    timings = cached_measurement(cache_file, probe, candidates, batches, heads, fused, compute_dtype)
    return plan_from_timings(timings), timings


def cached_measurement(
    cache_file: Path | None,
    probe: Callable[[], Probe],
    formats: Sequence[str],
    batches: Sequence[int],
    head_formats: dict[str, str] | None = None,
    fused: FusedKernels | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> dict[str, dict[int, float]]:
    """``measure``, remembered per machine, thread count, torch version, layer shapes and kernels, so a
    restart is quick and decides the same way (delete the file to measure again)."""
    taken = probe()
    key = measurement_key(taken, formats, batches, head_formats, fused, dtype)
    remembered = recall(cache_file, key)
    if remembered is None:
        with measuring_alone(cache_file):
            remembered = recall(cache_file, key)  # measured by a start that held the lock before this one
            if remembered is None:
                timings = measure(taken, formats, batches, head_formats, fused, dtype)
                remember(cache_file, key, timings)
                return timings
    logger.info("Weight formats as measured before on this machine (delete %s to measure again)", cache_file)
    return {f: {int(b): float(ms) for b, ms in t.items()} for f, t in remembered.items()}


def measurement_key(
    taken: Probe,
    formats: Sequence[str],
    batches: Sequence[int],
    head_formats: dict[str, str] | None,
    fused: FusedKernels | None,
    dtype: torch.dtype,
) -> str:
    """What a measurement depends on: machine, thread count, torch version, layer shapes and kernels."""
    return "|".join(
        [
            _cpu_model(),
            f"threads={torch.get_num_threads()}",
            f"torch={torch.__version__}",
            f"layers={taken.layers}",
            "shapes=" + ",".join("x".join(map(str, w.shape)) for w in [*taken.layer_weights, taken.head_weight]),
            "formats=" + ",".join(formats),
            "heads=" + ",".join(f"{k}:{v}" for k, v in sorted((head_formats or {}).items())),
            "batches=" + ",".join(map(str, batches)),
            f"fused={fused.build_key if fused is not None else 'off'}",
            f"dtype={dtype}",
        ]
    )


@contextmanager
def measuring_alone(cache_file: Path | None) -> Iterator[None]:
    """Hold the cache file's lock while measuring: processes starting together (``--workers N``, servers
    started side by side) measure one at a time, so no measurement runs on a CPU another one is loading,
    the later ones read what the first remembered instead of measuring again, and no ``remember`` drops
    another's key. Without a usable lock file this measures unlocked (as a cache-less start does)."""
    if cache_file is None:
        yield
        return
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        handle = open(cache_file.with_name(cache_file.name + ".lock"), "a")  # noqa: SIM115 - closed below
    except OSError:
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def recall(cache_file: Path | None, key: str) -> Any:
    """What ``remember`` stored under key in the cache file, or None."""
    return _read_json(cache_file).get(key) if cache_file else None


def remember(cache_file: Path | None, key: str, value: Any) -> None:
    if cache_file is None:
        return
    known = _read_json(cache_file)
    known[key] = value
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        partial = cache_file.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(known, indent=1))
        partial.replace(cache_file)  # a concurrent start reads the old file or the new one, never half
    except OSError as error:
        logger.warning("Could not remember the weight-format measurement in %s: %s", cache_file, error)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown-cpu"


def plan_from_timings(timings: dict[str, dict[int, float]]) -> WeightPlan:
    """Fastest at the smallest batch for small batches, fastest at the largest for the rest."""
    batches = sorted(next(iter(timings.values())))
    small = min(timings, key=lambda f: timings[f][batches[0]])
    large = min(timings, key=lambda f: timings[f][batches[-1]])
    if small == large:
        return WeightPlan.single(small)
    crossover = next(b for b in batches if timings[large][b] < timings[small][b])
    last_small = max(b for b in batches if b < crossover)
    return WeightPlan(((float(last_small), small), (UNBOUNDED, large)))


def measure(
    probe: Probe,
    formats: Sequence[str],
    batches: Sequence[int],
    head_formats: dict[str, str] | None = None,
    fused: FusedKernels | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> dict[str, dict[int, float]]:
    """Estimated ms of linear work per decode step, by format and batch size.

    Formats take turns within each repeat, and the best repeat counts, so a burst of other work on the
    machine slows every format alike instead of deciding the race.
    """
    heads = head_formats or {}
    kernels = {
        f: (
            [_kernel(f, w, fused, dtype, dtype) for w in probe.layer_weights],
            _kernel(heads.get(f, f), probe.head_weight, fused, dtype, torch.float32),
        )
        for f in formats
    }
    timings: dict[str, dict[int, float]] = {f: {} for f in formats}
    for batch in batches:
        calls = {
            f: (
                [(k, _input(batch, w, k)) for w, k in zip(probe.layer_weights, layer, strict=True)],
                [(head, _input(batch, probe.head_weight, head))],
            )
            for f, (layer, head) in kernels.items()
        }
        best = {f: (float("inf"), float("inf")) for f in formats}
        for attempt in range(REPEATS + 1):
            for fmt, (layer_calls, head_calls) in calls.items():
                layer_ms, head_ms = _run_ms(layer_calls), _run_ms(head_calls)
                if attempt:  # the first round warms caches and oneDNN's kernels for this shape
                    best[fmt] = (min(best[fmt][0], layer_ms), min(best[fmt][1], head_ms))
        for fmt, (layer_ms, head_ms) in best.items():
            timings[fmt][batch] = probe.layers * layer_ms + head_ms
    logger.info(
        "Weight formats measured (ms of linear work per step by batch size): %s",
        {f: {b: round(ms, 1) for b, ms in t.items()} for f, t in timings.items()},
    )
    return timings


def _kernel(
    fmt: str,
    weight: torch.Tensor,
    fused: FusedKernels | None = None,
    dtype: torch.dtype = torch.bfloat16,
    out_dtype: torch.dtype = torch.bfloat16,
) -> Kernel:
    if fmt == "int4" and int4_supported(weight.shape[1], weight.device):
        if Q4Kernel.fits(weight.shape[0], weight.shape[1], fused) and {dtype, out_dtype} <= FUSED_DTYPES:
            assert fused is not None  # the kernel a Q4 file's blocks get (LinearFactory)
            outliers = torch.arange(min(OUTLIER_CHANNELS, weight.shape[1]))
            return Q4Kernel.quantize(weight, None, outliers, fused, dtype, out_dtype)
        return Int4Kernel.quantize(weight, None)
    if fmt == "int8":
        return Int8Kernel.quantize(weight, None)
    if fmt == "w8a8" and w8a8_supported(weight.device):
        # The outlier channels' cost does not depend on which they are.
        outliers = torch.arange(min(OUTLIER_CHANNELS, weight.shape[1]))
        if fused is None or not {dtype, out_dtype} <= FUSED_DTYPES:
            return W8A8Kernel.quantize(weight, None, outliers)
        return W8A8Kernel.quantize(weight, None, outliers, fused, dtype, out_dtype)
    dtype = torch.bfloat16 if fmt in ("int4", "int8", "w8a8") else getattr(torch, fmt)  # unavailable here
    return FloatKernel.build(weight.to(dtype), None, pack=True)


def _input(batch: int, weight: torch.Tensor, kernel: Kernel) -> torch.Tensor:
    return torch.randn(batch, weight.shape[1]).to(kernel.dtype)


def _run_ms(calls: Sequence[tuple[Kernel, torch.Tensor]]) -> float:
    started = time.perf_counter()
    for kernel, x in calls:
        kernel(x)
    return (time.perf_counter() - started) * 1e3


# ----- the crossover, refined on whole decode steps of the built core ------------------------------------

STEP_BATCHES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
STEP_REPEATS = 3


def refine_crossover(
    plan: WeightPlan,
    time_steps: Callable[[int, float], float],
    max_batch: int,
    cache_file: Path | None = None,
    key: str = "",
) -> WeightPlan:
    """The two-format plan with its crossover moved to where whole decode steps of the built core cross.

    The per-kernel probe above picks the two formats well (they differ by 2x or more at its ends) but
    places the crossover poorly: near it the formats are within ~10%, and a lone layer's kernels run
    with caches, threads and fused.c's work unlike a real step's. ``time_steps(batch, small_limit)``
    times real decode steps of ``batch`` rows with the small format serving batches up to small_limit.
    """
    if len(plan.tiers) != 2:
        return plan
    (_, small), (_, large) = plan.tiers
    remembered = recall(cache_file, "steps|" + key)
    if remembered is None:
        with measuring_alone(cache_file):
            remembered = recall(cache_file, "steps|" + key)
            if remembered is None:
                timings = _time_both(time_steps, [b for b in STEP_BATCHES if b <= max_batch])
                remembered = {"limit": float(_last_small_batch(timings)), "ms": timings}
                remember(cache_file, "steps|" + key, remembered)
                logger.info("Decode steps timed per format (ms by batch size): %s", timings)
    limit = float(remembered["limit"])
    if limit >= max_batch:
        return WeightPlan.single(small)
    if limit < 1:
        return WeightPlan.single(large)
    return WeightPlan(((limit, small), (UNBOUNDED, large)))


def _time_both(time_steps: Callable[[int, float], float], batches: Sequence[int]) -> dict[str, dict[int, float]]:
    """ms per step of each format at each batch, the best of a few repeats; stops once the large format
    has won at two batch sizes in a row (larger batches only widen its lead)."""
    timings: dict[str, dict[int, float]] = {"small": {}, "large": {}}
    wins = 0
    for batch in batches:
        small = min(time_steps(batch, UNBOUNDED) for _ in range(STEP_REPEATS))
        large = min(time_steps(batch, 0) for _ in range(STEP_REPEATS))
        timings["small"][batch], timings["large"][batch] = round(small, 3), round(large, 3)
        wins = wins + 1 if large < small else 0
        if wins == 2:
            break
    return timings


def _last_small_batch(timings: dict[str, dict[int, float]]) -> int:
    """The largest batch size the small format won (0 if none); every size if the large one never won."""
    small, large = timings["small"], timings["large"]
    if all(small[b] <= large[b] for b in small):
        return 1 << 30
    return max((b for b in small if small[b] <= large[b]), default=0)


def machine_key() -> str:
    """What a measurement on this machine depends on besides the model: CPU, threads, torch."""
    return f"{_cpu_model()}|threads={torch.get_num_threads()}|torch={torch.__version__}"
