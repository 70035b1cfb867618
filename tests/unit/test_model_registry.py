"""The model registry with fake engines: routing by name, load on first use, waiting on a load within a
deadline, keep-alive unloading (an injected clock), least-recently-used eviction past the memory budget,
busy models kept, failed loads reported and retried, and the core-sharing hook."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import pytest

from tests.support.waiting import wait_until
from textgen.config import load_settings
from textgen.engine.types import Engine, EngineStats
from textgen.errors import ConfigError, DeadlineExceededError, ModelNotFoundError, ModelUnavailableError
from textgen.generation import GenerationService
from textgen.loader import LoadedModel
from textgen.services.model_registry import ModelRegistry, ModelSpec, ModelState, Serving
from textgen.state import model_specs

MiB = 2**20


@dataclass
class FakeEngine:
    name: str
    running: int = 0
    stopped: bool = False

    def stats(self) -> EngineStats:
        return EngineStats(running=self.running, waiting_interactive=0, waiting_background=0, tokens_per_s=0.0)

    def core_info(self) -> dict[str, object]:
        return {}


@dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Loads:
    """Builds fake servings; a model in ``gates`` waits for its event before it finishes loading."""

    sizes: dict[str, int]
    gates: dict[str, asyncio.Event] = field(default_factory=dict)
    failing: set[str] = field(default_factory=set)
    built: list[str] = field(default_factory=list)
    closed: list[str] = field(default_factory=list)

    async def build(self, spec: ModelSpec) -> Serving:
        gate = self.gates.get(spec.name)
        if gate is not None:
            await gate.wait()
        if spec.name in self.failing:
            raise RuntimeError(f"no weights for {spec.name}")
        self.built.append(spec.name)
        engine = FakeEngine(spec.name)
        return Serving(cast(LoadedModel, None), cast(Engine, engine), cast(GenerationService, spec.name))

    async def close(self, serving: Serving, grace_s: float) -> None:
        engine = cast(FakeEngine, serving.engine)
        engine.stopped = True
        self.closed.append(engine.name)

    def measure(self, serving: Serving) -> int:
        return self.sizes[cast(FakeEngine, serving.engine).name]


@dataclass
class Sharing:
    seen: list[list[str]] = field(default_factory=list)

    def engines_changed(self, engines: Mapping[str, Engine]) -> None:
        self.seen.append(sorted(engines))


def registry(loads: Loads, clock: Clock | None = None, **kwargs: Any) -> ModelRegistry:
    specs = [ModelSpec("a", "/nowhere/a", ("default",)), ModelSpec("b", "/nowhere/b"), ModelSpec("c", "/nowhere/c")]
    return ModelRegistry(specs, loads.build, loads.close, loads.measure, clock=clock or Clock(), **kwargs)


async def test_routes_by_name_and_alias_and_loads_on_first_use() -> None:
    loads = Loads({"a": MiB, "b": MiB, "c": MiB})
    models = registry(loads)
    await models.start()
    assert loads.built == ["a"]  # the default at start, the others on first use
    assert models.entries["b"].state is ModelState.UNLOADED
    async with models.use(None) as serving:
        assert cast(FakeEngine, serving.engine).name == "a"
    async with models.use("default") as serving:
        assert cast(FakeEngine, serving.engine).name == "a"
    async with models.use("b") as serving:
        assert cast(FakeEngine, serving.engine).name == "b"
    assert loads.built == ["a", "b"]
    assert models.entries["b"].state is ModelState.LOADED
    assert models.names(models.default) == ("a", "default")
    await models.stop(0)
    assert sorted(loads.closed) == ["a", "b"]


async def test_an_unknown_name_is_model_not_found() -> None:
    models = registry(Loads({"a": MiB}))
    await models.start()
    with pytest.raises(ModelNotFoundError) as error:
        async with models.use("gpt-4o"):
            pass
    assert "'gpt-4o'" in error.value.message and "'b'" in error.value.message
    assert error.value.status_code == 404
    await models.stop(0)


async def test_requests_wait_for_a_load_in_progress_and_share_it() -> None:
    loads = Loads({"a": MiB, "b": MiB}, gates={"b": asyncio.Event()})
    models = registry(loads)
    await models.start()

    async def ask() -> str:
        async with models.use("b", timeout_s=30) as serving:
            return cast(FakeEngine, serving.engine).name

    waiting = [asyncio.ensure_future(ask()) for _ in range(3)]
    await wait_until(lambda: models.entries["b"].leases == 3, what="three requests waiting")
    assert models.entries["b"].state is ModelState.LOADING
    assert not any(task.done() for task in waiting)
    loads.gates["b"].set()
    assert await asyncio.gather(*waiting) == ["b", "b", "b"]
    assert loads.built == ["a", "b"]  # one load for all three
    await models.stop(0)


async def test_a_request_waits_for_a_load_no_longer_than_its_deadline() -> None:
    loads = Loads({"a": MiB, "b": MiB}, gates={"b": asyncio.Event()})
    models = registry(loads)
    await models.start()
    with pytest.raises(DeadlineExceededError, match="still loading"):
        async with models.use("b", timeout_s=0.01):
            pass
    loads.gates["b"].set()  # the load goes on for the next request
    async with models.use("b", timeout_s=30) as serving:
        assert cast(FakeEngine, serving.engine).name == "b"
    assert loads.built == ["a", "b"]
    await models.stop(0)


async def test_keep_alive_unloads_idle_models_but_not_the_default_or_busy_ones() -> None:
    clock = Clock()
    loads = Loads({"a": MiB, "b": MiB, "c": MiB})
    models = registry(loads, clock, keep_alive_s=60)
    await models.start()
    async with models.use("b"):
        pass
    async with models.use("c"):
        pass
    clock.now += 59
    assert await models.unload_idle() == []
    cast(FakeEngine, models.entries["c"].serving and models.entries["c"].serving.engine).running = 1  # busy
    clock.now += 2
    assert await models.unload_idle() == ["b"]
    assert models.entries["b"].state is ModelState.UNLOADED and loads.closed == ["b"]
    assert models.entries["a"].state is ModelState.LOADED  # the default stays
    assert models.entries["c"].state is ModelState.LOADED  # still working
    async with models.use("b"):  # loads again on the next request
        pass
    assert loads.built == ["a", "b", "c", "b"]
    await models.stop(0)


async def test_a_held_model_is_not_unloaded_while_its_request_runs() -> None:
    clock = Clock()
    loads = Loads({"a": MiB, "b": MiB})
    models = registry(loads, clock, keep_alive_s=0)
    await models.start()
    async with models.use("b"):
        clock.now += 3600
        assert await models.unload_idle() == []
    assert await models.unload_idle() == ["b"]
    await models.stop(0)


async def test_negative_keep_alive_never_unloads() -> None:
    clock = Clock()
    models = registry(Loads({"a": MiB, "b": MiB}), clock, keep_alive_s=-1)
    await models.start()
    async with models.use("b"):
        pass
    clock.now += 10**9
    assert await models.unload_idle() == []
    await models.stop(0)


async def test_loading_past_the_budget_unloads_the_least_recently_used_idle_model() -> None:
    clock = Clock()
    loads = Loads({"a": 100 * MiB, "b": 100 * MiB, "c": 100 * MiB})
    sharing = Sharing()
    models = registry(loads, clock, memory_budget=300 * MiB, cores=sharing)
    await models.start()
    async with models.use("b"):
        pass
    clock.now += 1
    async with models.use("a"):  # the default is used more recently, but is never evicted anyway
        pass
    assert models.used_bytes == 200 * MiB
    models.entries["c"].memory_bytes = 150 * MiB  # its last load measured it: 350 MiB would pass 300
    async with models.use("c") as serving:
        assert cast(FakeEngine, serving.engine).name == "c"
    assert loads.closed == ["b"]
    assert models.entries["b"].state is ModelState.UNLOADED
    assert models.used_bytes <= 300 * MiB
    assert sharing.seen[-1] == ["a", "c"]  # the hook saw every change
    assert ["a", "b"] in sharing.seen
    await models.stop(0)


async def test_busy_models_leave_no_room_503_with_retry_after() -> None:
    loads = Loads({"a": 100 * MiB, "b": 100 * MiB, "c": 100 * MiB})
    models = registry(loads, memory_budget=250 * MiB)
    await models.start()
    async with models.use("b"):
        models.entries["c"].memory_bytes = 100 * MiB
        with pytest.raises(ModelUnavailableError) as error:
            async with models.use("c"):
                pass
    assert error.value.status_code == 503 and error.value.retry_after_s
    assert "'b'" in error.value.message and "TEXTGEN_MODEL_MEMORY" in error.value.message
    assert models.entries["b"].state is ModelState.LOADED
    async with models.use("c"):  # b is idle now: it makes room
        pass
    assert loads.closed == ["b"]
    await models.stop(0)


async def test_a_model_measured_larger_than_estimated_makes_room_after_its_load() -> None:
    clock = Clock()
    loads = Loads({"a": 100 * MiB, "b": 100 * MiB, "c": 120 * MiB})
    models = registry(loads, clock, memory_budget=300 * MiB)
    await models.start()
    async with models.use("b"):
        pass
    # c's estimate (no files on disk: 0 bytes) fits; its measured 120 MiB does not, so b goes after the load.
    async with models.use("c"):
        pass
    assert loads.closed == ["b"]
    assert models.used_bytes == 220 * MiB
    await models.stop(0)


async def test_a_model_too_large_for_the_budget_alone_is_refused_for_good() -> None:
    loads = Loads({"a": 100 * MiB, "b": 300 * MiB})
    models = registry(loads, memory_budget=250 * MiB)
    await models.start()
    with pytest.raises(ModelUnavailableError) as error:
        async with models.use("b"):
            pass
    assert "raise TEXTGEN_MODEL_MEMORY" in error.value.message and error.value.retry_after_s is None
    assert loads.closed == ["b"] and models.entries["b"].memory_bytes == 300 * MiB
    with pytest.raises(ModelUnavailableError):  # refused before loading, now that its size is known
        async with models.use("b"):
            pass
    assert loads.built == ["a", "b"]
    await models.stop(0)


async def test_a_failed_load_is_reported_and_tried_again() -> None:
    loads = Loads({"a": MiB, "b": MiB}, failing={"b"})
    models = registry(loads)
    await models.start()
    with pytest.raises(ModelUnavailableError, match="no weights for b"):
        async with models.use("b"):
            pass
    assert models.entries["b"].state is ModelState.FAILED
    assert models.entries["b"].describe()["error"] == "no weights for b"
    loads.failing.clear()
    async with models.use("b"):
        pass
    assert models.entries["b"].state is ModelState.LOADED and models.entries["b"].error is None
    await models.stop(0)


async def test_a_failing_default_fails_start() -> None:
    models = registry(Loads({"a": MiB}, failing={"a"}))
    with pytest.raises(ModelUnavailableError, match="no weights for a"):
        await models.start()


# ----- settings: TEXTGEN_MODELS, TEXTGEN_MODEL_MEMORY ------------------------------------------------------


def test_models_setting_names_each_source_and_the_default_takes_the_aliases() -> None:
    settings = load_settings(models=" smol=/m/smol , gemma=/m/gemma-3-270m.gguf", model_memory="2GiB")
    assert settings.model_sources == [("smol", "/m/smol"), ("gemma", "/m/gemma-3-270m.gguf")]
    assert int(settings.model_memory) == 2 * 1024**3
    assert model_specs(settings) == [
        ModelSpec("smol", "/m/smol", ("default",)),
        ModelSpec("gemma", "/m/gemma-3-270m.gguf", ("gemma-3-270m",)),
    ]
    assert load_settings().model_sources == []  # TEXTGEN_MODEL alone
    # The bundled model also answers to the name it is served under alone.
    (bundled,) = model_specs(load_settings(models="smol=bundled", model_aliases=""))
    assert bundled.aliases[0] == "SmolLM2-135M-Instruct"


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"models": "smol"}, "TEXTGEN_MODELS: Value error, each entry is name=source"),
        ({"models": "a=x,a=y"}, "the name 'a' is given twice"),
        ({"models": "a b=x"}, "no spaces"),
        ({"models": "a=x", "model": "bundled"}, "not both"),
        ({"model_memory": "lots"}, "TEXTGEN_MODEL_MEMORY"),
    ],
)
def test_bad_model_settings_fail_naming_the_variable(overrides: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load_settings(**overrides)


async def test_alternating_models_under_a_tight_budget_take_turns_instead_of_thrashing() -> None:
    """Two models that do not fit together, requested in turn: within the minimum residency the other one
    gets 503 with Retry-After = the residency left (no load, no unload); after it, one swap."""
    clock = Clock()
    loads = Loads({"a": 100 * MiB, "b": 100 * MiB, "c": 100 * MiB})
    models = registry(loads, clock, memory_budget=200 * MiB, min_residency_s=30)
    await models.start()
    async with models.use("b"):
        pass
    models.entries["c"].memory_bytes = 100 * MiB  # its last load measured it (else the estimate is its files)
    for _ in range(5):  # the attack: alternate c, b, c, b ... every second
        clock.now += 1
        with pytest.raises(ModelUnavailableError) as error:
            async with models.use("c"):
                pass
        assert error.value.status_code == 503
        assert error.value.retry_after_s == pytest.approx(30 - (clock.now - 1000))
        assert "TEXTGEN_MODEL_MIN_RESIDENCY_S" in error.value.message and "'b'" in error.value.message
        async with models.use("b"):
            pass
    assert loads.built == ["a", "b"] and loads.closed == []  # no load and no unload while b is resident
    assert models.entries["c"].state is ModelState.UNLOADED
    clock.now = 1000 + 30
    async with models.use("c"):  # b's residency is over: one swap
        pass
    assert loads.closed == ["b"] and loads.built == ["a", "b", "c"]
    clock.now += 1
    with pytest.raises(ModelUnavailableError) as error:  # and now c holds its turn
        async with models.use("b"):
            pass
    assert error.value.retry_after_s == pytest.approx(29)
    await models.stop(0)


async def test_residency_counts_from_the_last_load_not_the_last_use_and_busy_models_still_say_busy() -> None:
    clock = Clock()
    loads = Loads({"a": 100 * MiB, "b": 100 * MiB, "c": 100 * MiB})
    models = registry(loads, clock, memory_budget=200 * MiB, min_residency_s=30)
    await models.start()
    models.entries["c"].memory_bytes = 100 * MiB
    async with models.use("b"):
        clock.now += 40  # past b's residency, but b is busy: the busy message, 5 s retry
        with pytest.raises(ModelUnavailableError) as error:
            async with models.use("c"):
                pass
        assert "busy" in error.value.message and "MIN_RESIDENCY" not in error.value.message
    clock.now += 1
    async with models.use("c"):  # used a second ago, but loaded 41 s ago: evicted for c
        pass
    assert loads.closed == ["b"]
    await models.stop(0)


async def test_keep_alive_unloads_a_model_within_its_residency() -> None:
    clock = Clock()
    loads = Loads({"a": MiB, "b": MiB})
    models = registry(loads, clock, keep_alive_s=5, min_residency_s=30)
    await models.start()
    async with models.use("b"):
        pass
    clock.now += 6
    assert await models.unload_idle() == ["b"]
    await models.stop(0)


def test_min_residency_setting_is_checked() -> None:
    assert load_settings(model_min_residency_s=0).model_min_residency_s == 0
    assert load_settings().model_min_residency_s == 30
    with pytest.raises(ConfigError, match="TEXTGEN_MODEL_MIN_RESIDENCY_S"):
        load_settings(model_min_residency_s=-1)
