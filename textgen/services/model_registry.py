"""Several models in one server: which are configured, which are loaded, and when they load and unload.

``TEXTGEN_MODELS`` names the models (``smol=bundled,gemma=/models/gemma.gguf``; ``TEXTGEN_MODEL`` alone is
the one-model shorthand). The first is the default: it loads at start (``/ready`` waits for it), answers
requests that name no model, and stays loaded. The others load on first use, as Ollama's do:

* a request for a model that is loading waits for the load, within its own deadline (504 past it);
* a model idle for ``TEXTGEN_MODEL_KEEP_ALIVE_S`` is unloaded (its engine stopped, its memory freed);
* before a model loads, the least recently used idle models are unloaded until it fits in
  ``TEXTGEN_MODEL_MEMORY`` (its size estimated from its files on disk, or from its last load); if busy
  models leave no room, the request gets 503 with Retry-After. After the load its measured size (the core's
  weights and reserved KV cache) is checked again the same way;
* a model loaded less than ``TEXTGEN_MODEL_MIN_RESIDENCY_S`` ago is not unloaded to make room for another:
  requests alternating between two models that do not fit together would otherwise spend the machine on
  loads (each load evicting the model the next request wants). A request that would need it gets 503 with
  Retry-After = the seconds until its residency ends, so the models take turns of at least that long.

A model is busy while a request holds it (``use``: from choosing the model until its work is submitted,
or for a background job's whole run) or its engine has running or waiting work; busy models are never
unloaded. Loads run one at a time (each takes the cores and a peak of memory).

The engines of several loaded models share this process's cores: ``CoreSharing`` is told whenever the set
of loaded engines changes, so the thread sizing (``textgen.threads``/``textgen.openmp``) can give each its
share. Without one, each engine keeps the threads it was built with.

The registry knows nothing of HTTP: it raises ``ModelNotFoundError`` (404), ``DeadlineExceededError``
(504) and ``ModelUnavailableError`` (503).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from textgen.engine.types import Engine, EngineStats
from textgen.errors import DeadlineExceededError, ModelNotFoundError, ModelUnavailableError
from textgen.generation import GenerationService
from textgen.loader import LoadedModel

logger = logging.getLogger(__name__)

# How much of an unknown name an error message repeats (the name is the client's input).
_ECHO_CHARS = 100
# What a client is told to wait when busy models leave no room for another one.
BUSY_RETRY_AFTER_S = 5.0
# How often idle models are looked for, at most (a keep-alive shorter than this is checked this often).
REAP_INTERVAL_S = 1.0
WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


class ModelState(StrEnum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    LOADED = "loaded"
    UNLOADING = "unloading"
    FAILED = "failed"  # the last load failed; the next request tries again


@dataclass(frozen=True)
class ModelSpec:
    """One configured model: the name clients use, where its weights come from, and its other names."""

    name: str
    source: str
    aliases: tuple[str, ...] = ()


@dataclass
class Serving:
    """A loaded model, ready to serve: the weights, its engine (started) and its generation service."""

    model: LoadedModel
    engine: Engine
    service: GenerationService


class CoreSharing(Protocol):
    """The hook for sharing the CPU cores between the engines of loaded models (textgen.threads /
    textgen.openmp implement it): called with every loaded engine, by model name, after each load or unload."""

    def engines_changed(self, engines: Mapping[str, Engine]) -> None: ...


class NoCoreSharing:
    def engines_changed(self, engines: Mapping[str, Engine]) -> None:
        return None


Build = Callable[[ModelSpec], Awaitable[Serving]]
Close = Callable[[Serving, float], Awaitable[None]]  # (serving, grace_s): stop the engine, free the rest
Measure = Callable[[Serving], int]


@dataclass
class ModelEntry:
    spec: ModelSpec
    pinned: bool = False  # the default model: loaded at start and never unloaded
    state: ModelState = ModelState.UNLOADED
    serving: Serving | None = None
    load_task: asyncio.Task[Serving] | None = None
    last_used: float = 0.0
    leases: int = 0
    memory_bytes: int | None = None  # measured at its last load
    resident_since: float = 0.0  # the registry's clock when its last load finished (minimum residency)
    loaded_at: float | None = None  # wall-clock seconds, for the listing
    loads: int = 0
    error: str | None = None  # why the last load failed

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def busy(self) -> bool:
        if self.leases:
            return True
        if self.serving is None:
            return False
        stats = self.serving.engine.stats()
        return bool(stats.running or stats.waiting_interactive or stats.waiting_background)

    def describe(self) -> dict[str, object]:
        """What GET /v1/models and /stats show for it."""
        return {
            "state": self.state.value,
            "memory_bytes": self.memory_bytes if self.state is ModelState.LOADED else None,
            "default": self.pinned,
            "loaded_at": None if self.loaded_at is None else int(self.loaded_at),
            "loads": self.loads,
            "error": self.error,
        }


@dataclass
class ModelRegistry:
    specs: list[ModelSpec]
    build: Build
    close: Close
    measure: Measure
    keep_alive_s: float = 300.0  # negative: never
    memory_budget: int = 0  # bytes; 0: no budget
    # Seconds a loaded model stays before it may be evicted for another (0: none, this class's default for
    # tests of eviction alone; the server passes TEXTGEN_MODEL_MIN_RESIDENCY_S). Keep-alive unloading is
    # separate: an idle model past its keep-alive goes whatever its residency.
    min_residency_s: float = 0.0
    clock: Callable[[], float] = time.monotonic
    cores: CoreSharing = field(default_factory=NoCoreSharing)
    on_change: Callable[[ModelEntry, str], None] | None = None  # (the model, why its state changed): metrics
    created: int = field(default_factory=lambda: int(time.time()))  # the models' "created" in GET /v1/models
    entries: dict[str, ModelEntry] = field(init=False)
    _names: dict[str, str] = field(init=False)  # every name and alias -> the model's name
    _load_lock: asyncio.Lock = field(init=False, default_factory=asyncio.Lock)
    _reaper: asyncio.Task[None] | None = field(init=False, default=None)
    _stopping: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        if not self.specs:
            raise ValueError("a registry needs at least one model")
        self.entries = {spec.name: ModelEntry(spec, pinned=index == 0) for index, spec in enumerate(self.specs)}
        self._names = {}
        for spec in self.specs:
            self._names[spec.name] = spec.name
        for spec in self.specs:  # a model's own name wins over another's alias
            for alias in spec.aliases:
                if self._names.setdefault(alias, spec.name) != spec.name:
                    logger.warning("The alias %r of %s is taken by another model; ignored", alias, spec.name)

    # ----- lookups -------------------------------------------------------------------------------------

    @property
    def default(self) -> ModelEntry:
        return self.entries[self.specs[0].name]

    @property
    def default_serving(self) -> Serving:
        serving = self.default.serving
        assert serving is not None, "the default model is loaded by start()"
        return serving

    def names(self, entry: ModelEntry) -> tuple[str, ...]:
        """The model's name, then its aliases (as GET /v1/models lists them)."""
        return (entry.name, *(alias for alias, name in self._names.items() if name == entry.name and alias != name))

    def resolve(self, requested: str | None) -> ModelEntry:
        """The model a request's ``model`` names (None: the default); 404 model_not_found for another name."""
        if requested is None:
            return self.default
        name = self._names.get(requested)
        if name is None:
            raise ModelNotFoundError(self._not_found_message(requested))
        return self.entries[name]

    def _not_found_message(self, requested: str) -> str:
        shown = requested if len(requested) <= _ECHO_CHARS else requested[:_ECHO_CHARS] + "..."
        served = ", ".join(repr(name) for name in self._names)
        return (
            f"The model {shown!r} does not exist on this server. It serves {served}: name one of those in "
            "'model', or leave 'model' out for the default (GET /v1/models lists them)."
        )

    def loaded(self) -> dict[str, Serving]:
        return {name: e.serving for name, e in self.entries.items() if e.serving is not None}

    @property
    def used_bytes(self) -> int:
        return sum(e.memory_bytes or 0 for e in self.entries.values() if e.serving is not None)

    # ----- start, stop -------------------------------------------------------------------------------

    async def start(self, preloaded: Serving | None = None) -> Serving:
        """Load the default model (start-up waits for it and fails with its error; ``preloaded``: it is
        loaded already), then watch for idle ones."""
        if preloaded is None:
            serving = await self._load(self.default)
        else:
            serving = self._loaded(self.default, preloaded)
        if self.keep_alive_s >= 0 and len(self.entries) > 1:
            self._reaper = asyncio.get_running_loop().create_task(self._reap_forever(), name="textgen-model-reaper")
        return serving

    async def stop(self, grace_s: float) -> None:
        """Stop every engine (each lets its running requests finish for ``grace_s``); a load under way is
        awaited and its engine stopped too."""
        self._stopping = True
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for entry in self.entries.values():
            if entry.load_task is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(entry.load_task)
        await asyncio.gather(
            *(self._unload(e, "shutdown", grace_s) for e in self.entries.values() if e.serving is not None)
        )

    # ----- using a model -----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def use(self, requested: str | None, timeout_s: float | None = None) -> AsyncIterator[Serving]:
        """The named model, loaded (waiting for its load at most ``timeout_s``), held busy inside the block."""
        entry = self.resolve(requested)
        entry.leases += 1
        try:
            serving = await self._ready(entry, timeout_s)
            entry.last_used = self.clock()
            yield serving
        finally:
            entry.leases -= 1
            entry.last_used = self.clock()

    @contextlib.asynccontextmanager
    async def service_for(
        self, requested: str | None, timeout_s: float | None = None
    ) -> AsyncIterator[GenerationService]:
        """``use``, for callers that need only the model's generation service (the job runner)."""
        async with self.use(requested, timeout_s) as serving:
            yield serving.service

    def engine_stats(self) -> EngineStats:
        """Every loaded engine's numbers, summed (the /metrics gauges and counters, /stats); a number an engine
        may not keep (None) stays None only when no engine keeps it."""
        stats = [serving.engine.stats() for serving in self.loaded().values()]
        summed: dict[str, Any] = {}
        for found in dataclasses.fields(EngineStats):
            values = [getattr(s, found.name) for s in stats if getattr(s, found.name) is not None]
            summed[found.name] = sum(values) if values else (None if found.default is None else 0)
        return EngineStats(**summed)

    async def _ready(self, entry: ModelEntry, timeout_s: float | None) -> Serving:
        if entry.serving is not None and entry.state is ModelState.LOADED:
            return entry.serving
        if self._stopping:
            raise ModelUnavailableError(f"The model {entry.name!r} is not loaded and the server is shutting down.")
        if entry.load_task is None:
            self._set_state(entry, ModelState.LOADING, "requested")  # listed as loading from now on
            task = asyncio.get_running_loop().create_task(self._load(entry), name=f"textgen-load-{entry.name}")
            task.add_done_callback(_retrieve_failure)  # every waiter may have timed out; it was logged
            entry.load_task = task
        try:
            return await asyncio.wait_for(asyncio.shield(entry.load_task), timeout_s)
        except TimeoutError:
            raise DeadlineExceededError(
                f"The model {entry.name!r} is still loading and the request's deadline passed; retry shortly "
                "(or give a longer timeout)."
            ) from None

    async def _load(self, entry: ModelEntry) -> Serving:
        try:
            async with self._load_lock:
                if entry.serving is not None:  # loaded while this load waited for the lock
                    return entry.serving
                try:
                    await self._make_room(entry, self.estimate_bytes(entry))
                except ModelUnavailableError:
                    self._set_state(entry, ModelState.UNLOADED, "no room")
                    raise
                if entry.state is not ModelState.LOADING:
                    self._set_state(entry, ModelState.LOADING, "requested")
                started = time.perf_counter()
                try:
                    serving = await self.build(entry.spec)
                except Exception as error:
                    entry.error = str(error) or type(error).__name__
                    self._set_state(entry, ModelState.FAILED, "load failed")
                    logger.error("Loading model %s failed: %s", entry.name, entry.error)
                    raise ModelUnavailableError(
                        f"The model {entry.name!r} failed to load: {entry.error}", retry_after_s=None
                    ) from error
                self._loaded(entry, serving)
                logger.info(
                    "Model %s loaded in %.1fs (%.0f MiB; %d model(s) loaded, %.0f MiB in all)",
                    entry.name,
                    time.perf_counter() - started,
                    (entry.memory_bytes or 0) / 2**20,
                    len(self.loaded()),
                    self.used_bytes / 2**20,
                )
                await self._fit_after_load(entry)
                return serving
        finally:
            entry.load_task = None

    def _loaded(self, entry: ModelEntry, serving: Serving) -> Serving:
        entry.memory_bytes = self.measure(serving)
        entry.serving, entry.error = serving, None
        entry.loads += 1
        entry.loaded_at, entry.last_used = time.time(), self.clock()
        entry.resident_since = entry.last_used
        self._set_state(entry, ModelState.LOADED, "loaded")
        self.cores.engines_changed({name: s.engine for name, s in self.loaded().items()})
        return serving

    async def _fit_after_load(self, entry: ModelEntry) -> None:
        """The measured size may exceed the estimate: unload idle models for it, or unload it again."""
        if not self.memory_budget or self.used_bytes <= self.memory_budget:
            return
        over = self.used_bytes - self.memory_budget
        victims = self._victims(entry, over)
        if victims is None:
            measured = entry.memory_bytes or 0
            await self._detach(entry, "over_budget", 0.0, "measured larger than TEXTGEN_MODEL_MEMORY leaves")
            raise self._no_room(entry, measured)
        why = f"least recently used, room for {entry.name}"
        await asyncio.gather(*(self._detach(victim, "evicted", 0.0, why) for victim in victims))

    async def _make_room(self, entry: ModelEntry, needed: int) -> None:
        """Before a load: unload the least recently used idle models until ``needed`` bytes fit in the
        budget; 503 when busy or pinned models leave no room."""
        if not self.memory_budget:
            return
        over = self.used_bytes + needed - self.memory_budget
        if over <= 0:
            return
        victims = self._victims(entry, over)
        if victims is None:
            raise self._no_room(entry, needed)
        # All are taken out of service before any await, so none is handed to a request meanwhile.
        closing = [
            self._detach(victim, "evicted", 0.0, f"least recently used, room for {entry.name}") for victim in victims
        ]
        await asyncio.gather(*closing)

    def _victims(self, entry: ModelEntry, over: int) -> list[ModelEntry] | None:
        """Idle, unpinned loaded models past their minimum residency, least recently used first, freeing at
        least ``over`` bytes (None: cannot)."""
        now = self.clock()
        candidates = sorted(
            (e for e in self._idle_others(entry) if self._residency_left_s(e, now) <= 0), key=lambda e: e.last_used
        )
        chosen: list[ModelEntry] = []
        for candidate in candidates:
            if over <= 0:
                break
            chosen.append(candidate)
            over -= candidate.memory_bytes or 0
        return chosen if over <= 0 else None

    def _idle_others(self, entry: ModelEntry) -> list[ModelEntry]:
        """The loaded models other than ``entry`` that may be unloaded for it, residency aside."""
        return [
            e for e in self.entries.values() if e is not entry and e.serving is not None and not e.pinned and not e.busy
        ]

    def _residency_left_s(self, entry: ModelEntry, now: float) -> float:
        return entry.resident_since + self.min_residency_s - now

    def _room_after_residency_s(self, entry: ModelEntry, needed: int) -> float | None:
        """Seconds until idle models' residencies end and they free room for ``needed`` bytes, counting
        only models idle now (None: busy or pinned models would still leave no room)."""
        now = self.clock()
        over = self.used_bytes + needed - self.memory_budget
        for candidate in sorted(self._idle_others(entry), key=lambda e: self._residency_left_s(e, now)):
            over -= candidate.memory_bytes or 0
            if over <= 0:
                return max(0.0, self._residency_left_s(candidate, now))
        return None

    def _no_room(self, entry: ModelEntry, needed: int) -> ModelUnavailableError:
        others = [e for e in self.entries.values() if e is not entry and e.serving is not None]
        if sum(e.memory_bytes or 0 for e in others if e.pinned) + needed > self.memory_budget:
            return ModelUnavailableError(
                f"The model {entry.name!r} needs about {needed / 2**20:.0f} MiB, more than TEXTGEN_MODEL_MEMORY "
                f"({self.memory_budget / 2**20:.0f} MiB) leaves beside the default model; raise "
                "TEXTGEN_MODEL_MEMORY or serve a smaller model.",
                retry_after_s=None,
            )
        wait_s = self._room_after_residency_s(entry, needed)
        if wait_s is not None:
            resident = ", ".join(repr(e.name) for e in self._idle_others(entry))
            return ModelUnavailableError(
                f"The model {entry.name!r} needs about {needed / 2**20:.0f} MiB and TEXTGEN_MODEL_MEMORY "
                f"({self.memory_budget / 2**20:.0f} MiB) is taken by models loaded less than "
                f"TEXTGEN_MODEL_MIN_RESIDENCY_S ({self.min_residency_s:g}s) ago ({resident}): they are not "
                "unloaded sooner, so that requests alternating between models do not spend the server on loads. "
                "Retry after the time in the Retry-After header, or raise TEXTGEN_MODEL_MEMORY to keep both.",
                retry_after_s=max(0.1, wait_s),  # the header rounds it up to whole seconds
            )
        busy = ", ".join(repr(e.name) for e in others if e.busy)
        return ModelUnavailableError(
            f"The model {entry.name!r} needs about {needed / 2**20:.0f} MiB and TEXTGEN_MODEL_MEMORY "
            f"({self.memory_budget / 2**20:.0f} MiB) is taken by models that are busy ({busy}); retry after "
            "the time in the Retry-After header.",
            retry_after_s=BUSY_RETRY_AFTER_S,
        )

    def estimate_bytes(self, entry: ModelEntry) -> int:
        """What loading the model will take: its last measured size, else its weight files' size on disk."""
        if entry.memory_bytes is not None:
            return entry.memory_bytes
        return weight_file_bytes(entry.spec.source)

    # ----- unloading ---------------------------------------------------------------------------------

    def _detach(self, entry: ModelEntry, reason: str, grace_s: float, detail: str = "") -> asyncio.Task[None]:
        """Take the model out of service now (a new request loads it again) and stop its engine in a task
        (running requests get ``grace_s`` to finish). ``reason``: keep_alive, evicted, over_budget, shutdown."""
        serving = entry.serving
        assert serving is not None
        entry.serving = None
        self._set_state(entry, ModelState.UNLOADING, reason)
        logger.info("Unloading model %s (%s)", entry.name, detail or reason)
        self.cores.engines_changed({name: s.engine for name, s in self.loaded().items()})

        async def finish() -> None:
            try:
                await self.close(serving, grace_s)
            finally:
                if entry.state is ModelState.UNLOADING:
                    self._set_state(entry, ModelState.UNLOADED, reason)

        return asyncio.get_running_loop().create_task(finish(), name=f"textgen-unload-{entry.name}")

    async def _unload(self, entry: ModelEntry, reason: str, grace_s: float, detail: str = "") -> None:
        if entry.serving is not None:
            await self._detach(entry, reason, grace_s, detail)

    async def unload_idle(self) -> list[str]:
        """Unload every unpinned model idle for longer than the keep-alive; the names unloaded."""
        if self.keep_alive_s < 0:
            return []
        now = self.clock()
        expired = [
            e
            for e in self.entries.values()
            if e.serving is not None and not e.pinned and not e.busy and now - e.last_used >= self.keep_alive_s
        ]
        for entry in expired:
            await self._unload(entry, "keep_alive", 0.0, f"idle for {self.keep_alive_s:g}s, TEXTGEN_MODEL_KEEP_ALIVE_S")
        return [e.name for e in expired]

    async def _reap_forever(self) -> None:
        interval = min(REAP_INTERVAL_S, max(self.keep_alive_s / 4, 0.05))
        failing: str | None = None
        while True:
            await asyncio.sleep(interval)
            try:
                await self.unload_idle()
                failing = None
            except Exception as error:  # logged when it starts, not every round
                if failing != repr(error):
                    logger.exception("Unloading idle models failed (logged again only if the error changes)")
                failing = repr(error)

    def _set_state(self, entry: ModelEntry, state: ModelState, reason: str) -> None:
        entry.state = state
        if self.on_change is not None:
            self.on_change(entry, reason)


def _retrieve_failure(task: asyncio.Task[Serving]) -> None:
    if not task.cancelled():
        task.exception()


def return_free_memory_to_the_system() -> None:
    """glibc keeps freed blocks in its heap; malloc_trim hands the free pages of an unloaded model back to
    the kernel, so they leave the resident set instead of waiting there for reuse."""
    with contextlib.suppress(OSError, AttributeError, TypeError):  # not glibc: later allocations reuse it
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)


def weight_file_bytes(source: str) -> int:
    """The size of a model's weight files (a file, or the weight files of a folder); 0 when unknown (a hub
    id: the size is measured at its first load)."""
    if source == "bundled":
        from textgen.loader import find_bundled_gguf  # resolved only when asked: it reads package metadata

        try:
            return find_bundled_gguf().stat().st_size
        except Exception:
            return 0
    path = Path(source).expanduser()
    try:
        if path.is_file():
            return path.stat().st_size
        if path.is_dir():
            return sum(f.stat().st_size for f in path.iterdir() if f.suffix in WEIGHT_FILE_SUFFIXES and f.is_file())
    except OSError:
        return 0
    return 0


def measured_bytes(serving: Serving) -> int:
    """A loaded model's memory: its core's weights and reserved KV cache when the core reports them, else
    the parameters and buffers of the transformers model that serves it."""
    info = serving.engine.core_info()
    weights, cache = info.get("weights_bytes"), info.get("kv_cache_bytes")
    if isinstance(weights, int) and isinstance(cache, int):
        return weights + cache
    model = serving.model.model
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)
