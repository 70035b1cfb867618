"""Run the costliest test modules first, so no xdist worker idles at the end of ``make test``.

``make test`` runs ``-n 2 --dist loadfile``: a module is a work unit that one worker runs whole. xdist's
default (``--loadscope-reorder``) hands units out by *number of tests*, most first, which puts the
end-to-end modules (a few tests, each tens of seconds) last: the run ended with one worker still inside
a 100-second module while the other had nothing left. Ordering the collection by each module's recorded
cost, costliest first (``make test`` passes ``--no-loadscope-reorder`` so xdist keeps this order), makes
the last units the short unit-test modules that fill the gap.

The costs live in ``tests/module_costs.json`` (seconds per module file, setup + call + teardown). A module
not listed gets its layer's default below. Refresh the file from a whole run:
``pytest ... --record-module-costs=PATH`` writes the measured costs of that run to PATH (``make test``
writes ``.cache/test-module-costs.json``); copy it over ``tests/module_costs.json`` when modules were added
or grew. Only the order changes: every test still runs, in its module's own order.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest

COSTS_FILE = Path(__file__).resolve().parent.parent / "module_costs.json"

# A module missing from the costs file: a guess by layer (the layers that start servers cost the most).
LAYER_DEFAULT_S: dict[str, float] = {
    "tests/ray/": 60.0,
    "tests/e2e/": 15.0,
    "tests/browser/": 10.0,
    "tests/clients/": 10.0,
    "tests/integration/": 4.0,
    "tests/unit/": 2.0,
}
OTHER_DEFAULT_S = 2.0


def module_of(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def load_costs(path: Path = COSTS_FILE) -> dict[str, float]:
    if not path.exists():
        return {}
    raw = json.loads(path.read_text(encoding="utf-8"))
    return {str(name): float(seconds) for name, seconds in raw.get("modules", {}).items()}


def cost_of(module: str, costs: dict[str, float]) -> float:
    if module in costs:
        return costs[module]
    for prefix, seconds in LAYER_DEFAULT_S.items():
        if module.startswith(prefix):
            return seconds
    return OTHER_DEFAULT_S


def order_by_cost(items: list[pytest.Item], costs: dict[str, float]) -> list[pytest.Item]:
    """Costliest module first; a module's tests stay together and in their own order (the sort is stable,
    and ties keep collection order)."""
    first_seen: dict[str, int] = {}
    for index, item in enumerate(items):
        first_seen.setdefault(module_of(item.nodeid), index)

    def key(item: pytest.Item) -> tuple[float, int]:
        module = module_of(item.nodeid)
        return (-cost_of(module, costs), first_seen[module])

    return sorted(items, key=key)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--record-module-costs",
        metavar="PATH",
        default=None,
        help="write each test module's measured seconds (setup + call + teardown) of this run to PATH as JSON "
        "(the format of tests/module_costs.json)",
    )


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items[:] = order_by_cost(items, load_costs())


class CostRecorder:
    """Sums report durations per module. Registered only where no xdist worker runs (the controller, or a
    plain run): the controller sees every worker's reports."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seconds: defaultdict[str, float] = defaultdict(float)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.seconds[module_of(report.nodeid)] += report.duration

    def pytest_sessionfinish(self) -> None:
        ranked = dict(sorted(((m, round(s, 1)) for m, s in self.seconds.items()), key=lambda kv: -kv[1]))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({"modules": ranked}, indent=1) + "\n", encoding="utf-8")


def pytest_configure(config: pytest.Config) -> None:
    path = config.getoption("--record-module-costs")
    if path and not hasattr(config, "workerinput"):
        config.pluginmanager.register(CostRecorder(Path(path)), "module-cost-recorder")
