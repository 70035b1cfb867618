"""The weight-format measurement's cache file under processes starting together.

Servers started side by side (``uvicorn --workers N``, tests starting several at once) all find no
measurement on a machine's first start. One measures while holding the cache file's lock; the others wait
for it and read what it remembered, instead of measuring at the same time on a CPU that the first one is
loading (slower, and a worse plan) and overwriting each other's keys.
"""

from __future__ import annotations

import fcntl
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from textgen.engine.core import calibrate
from textgen.engine.core.calibrate import Probe, cached_measurement, measurement_key, refine_crossover, remember
from textgen.engine.core.weights import UNBOUNDED, WeightPlan

FORMATS = ["int4", "bfloat16"]
BATCHES = [1, 4]


def probe() -> Probe:
    return Probe([torch.zeros(8, 4)], torch.zeros(16, 4), 2)


def while_another_start_measures(
    monkeypatch: pytest.MonkeyPatch, cache_file: Path, start: Callable[[], Any], other_result: Callable[[], None]
) -> Any:
    """Hold the cache file's lock as another process measuring would; once ``start`` (in a thread) has found
    the cache empty, write that process's result (``other_result``) and release the lock. Returns what
    ``start`` returned."""
    looked = threading.Event()
    real_recall = calibrate.recall

    def recall(cache_file: Path | None, key: str) -> Any:
        found = real_recall(cache_file, key)
        looked.set()
        return found

    monkeypatch.setattr(calibrate, "recall", recall)
    result: dict[str, Any] = {}
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    with open(cache_file.with_name(cache_file.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        thread = threading.Thread(target=lambda: result.update(value=start()), daemon=True)
        thread.start()
        assert looked.wait(30), "the start never looked into the cache file"
        other_result()
        fcntl.flock(lock, fcntl.LOCK_UN)
    thread.join(30)
    assert not thread.is_alive() and "value" in result
    return result["value"]


def test_a_start_that_finds_another_measuring_waits_and_reads_its_result(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cache_file = tmp_path / "cache" / "weight-formats.json"
    theirs = {"int4": {1: 5.0, 4: 6.0}, "bfloat16": {1: 7.0, 4: 8.0}}
    measured: list[int] = []
    monkeypatch.setattr(calibrate, "measure", lambda *args, **kwargs: measured.append(1) or {"int4": {1: 0.0}})
    key = measurement_key(probe(), FORMATS, BATCHES, None, None, torch.bfloat16)

    value = while_another_start_measures(
        monkeypatch,
        cache_file,
        lambda: cached_measurement(cache_file, probe, FORMATS, BATCHES),
        lambda: remember(cache_file, key, theirs),
    )
    assert measured == []  # it waited for the lock, then read the other start's measurement
    assert value == theirs


def test_the_decode_step_timing_also_waits_for_a_start_timing_them(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cache_file = tmp_path / "cache" / "weight-formats.json"
    plan = WeightPlan(((8.0, "int4"), (UNBOUNDED, "bfloat16")))
    timed: list[int] = []

    def time_steps(batch: int, small_limit: float) -> float:
        timed.append(batch)
        return 1.0

    value = while_another_start_measures(
        monkeypatch,
        cache_file,
        lambda: refine_crossover(plan, time_steps, 64, cache_file, "key"),
        lambda: remember(cache_file, "steps|key", {"limit": 4, "ms": {}}),
    )
    assert timed == []  # no decode step timed: the other start's crossover was read
    assert value.tiers == ((4.0, "int4"), (UNBOUNDED, "bfloat16"))

