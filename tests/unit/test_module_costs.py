"""The run order of make test: costliest modules first, each module whole and in its own order."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tests.support.module_costs import COSTS_FILE, CostRecorder, cost_of, load_costs, order_by_cost


@dataclass
class FakeItem:
    nodeid: str


@dataclass
class FakeReport:
    nodeid: str
    duration: float


def order(nodeids: list[str], costs: dict[str, float]) -> list[str]:
    items = [FakeItem(nodeid) for nodeid in nodeids]
    return [item.nodeid for item in order_by_cost(items, costs)]  # type: ignore[arg-type]


def test_costliest_module_first_and_each_module_keeps_its_order() -> None:
    nodeids = ["tests/unit/a.py::t1", "tests/unit/a.py::t2", "tests/e2e/b.py::t1", "tests/unit/c.py::t1",
               "tests/e2e/b.py::t2"]
    costs = {"tests/unit/a.py": 1.0, "tests/e2e/b.py": 90.0, "tests/unit/c.py": 5.0}
    assert order(nodeids, costs) == [
        "tests/e2e/b.py::t1", "tests/e2e/b.py::t2", "tests/unit/c.py::t1", "tests/unit/a.py::t1", "tests/unit/a.py::t2",
    ]


def test_equal_costs_keep_collection_order() -> None:
    nodeids = ["tests/unit/z.py::t", "tests/unit/a.py::t", "tests/unit/m.py::t"]
    assert order(nodeids, {}) == nodeids


def test_an_unlisted_module_gets_its_layers_default() -> None:
    assert cost_of("tests/ray/test_new.py", {}) > cost_of("tests/e2e/test_new.py", {}) > cost_of("tests/unit/x.py", {})
    assert cost_of("tests/unit/x.py", {"tests/unit/x.py": 500.0}) == 500.0


def test_the_recorded_costs_name_existing_modules() -> None:
    root = COSTS_FILE.parent.parent
    missing = [module for module in load_costs() if not (root / module).is_file()]
    assert load_costs(), "tests/module_costs.json lists no module"
    assert not missing, f"tests/module_costs.json names modules that are gone (re-record it): {missing}"


def test_the_recorder_writes_the_format_it_reads(tmp_path: Path) -> None:
    path = tmp_path / "costs.json"
    recorder = CostRecorder(path)
    for nodeid, seconds in [("tests/e2e/b.py::t1", 2.0), ("tests/e2e/b.py::t1", 30.0), ("tests/unit/a.py::t", 0.5)]:
        recorder.pytest_runtest_logreport(FakeReport(nodeid, seconds))  # type: ignore[arg-type]
    recorder.pytest_sessionfinish()
    assert load_costs(path) == {"tests/e2e/b.py": 32.0, "tests/unit/a.py": 0.5}
    assert list(json.loads(path.read_text())["modules"]) == ["tests/e2e/b.py", "tests/unit/a.py"]
