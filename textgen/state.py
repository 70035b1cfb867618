"""Everything the service builds at start-up, in one object, and the order it is torn down in."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from textgen.access import (
    AccessPolicy,
    FailedKeyLimiter,
    bind_host_from_argv,
    warn_about_short_keys,
    warn_if_exposed_without_keys,
)
from textgen.backends import Backends, build_backends
from textgen.config import Settings
from textgen.content_filter import ContentFilter
from textgen.engine import Engine, cores_from_settings, create_engine
from textgen.errors import (
    ConfigError,
    InsufficientStorageError,
    ModelLoadError,
    ModelUnavailableError,
    NotReadyError,
    StoreUnavailableError,
)
from textgen.generation import GenerationService, StreamSlots
from textgen.jobs.store import JobState, JobStore
from textgen.jobs.view import job_payload
from textgen.loader import BUNDLED, BUNDLED_NAME, LoadedModel, find_bundled_gguf, load_model
from textgen.metrics import Metrics, mark_process_dead
from textgen.ratelimit import RateLimiter
from textgen.services.batch_lines import JOB_EXECUTORS, batch_line_planner
from textgen.services.model_registry import (
    CoreSharing,
    ModelEntry,
    ModelRegistry,
    ModelSpec,
    NoCoreSharing,
    Serving,
    measured_bytes,
    return_free_memory_to_the_system,
)
from textgen.services.models import served_models
from textgen.services.responses import RESPONSE_EXECUTORS
from textgen.threads import run_in_own_thread
from textgen.webhooks import sender_from_settings
from textgen.workers.batches import Batches, start_batches
from textgen.workers.runner import JobRunner, RunnerConfig, process_owner_id
from textgen.workers.webhooks import JobWebhooks

logger = logging.getLogger(__name__)

ModelLoader = Callable[[Settings], LoadedModel]
EngineFactory = Callable[[Settings, LoadedModel], Engine]

GAUGE_REFRESH_S = 2.0
SHUTTING_DOWN = (
    "The server is not ready: it is shutting down and takes no new work; retry after the time in the "
    "Retry-After header (another replica, or this one once restarted, answers)."
)
SHUTDOWN_RETRY_AFTER_S = 2.0


@dataclass
class AppState:
    settings: Settings
    model: LoadedModel
    engine: Engine
    store: JobStore
    runner: JobRunner
    service: GenerationService
    metrics: Metrics
    access: AccessPolicy
    registry: ModelRegistry  # every configured model; model, engine and service above are the default's
    failed_keys: FailedKeyLimiter = field(default_factory=lambda: FailedKeyLimiter(10))
    streams: StreamSlots = field(default_factory=lambda: StreamSlots(0))
    shutting_down: bool = False

    gauge_task: asyncio.Task[None] | None = None
    drain_task: asyncio.Task[None] | None = None
    batches: Batches | None = None  # files and batches (the OpenAI Batch API)
    backends: Backends | None = None  # the stores and the limiter, closed at shutdown

    @property
    def ready(self) -> bool:
        return self.engine.ready and not self.shutting_down

    def not_ready(self) -> NotReadyError:
        """The 503 (with Retry-After) for a request this process will not take now."""
        if self.shutting_down:
            return NotReadyError(SHUTTING_DOWN, retry_after_s=SHUTDOWN_RETRY_AFTER_S)
        return NotReadyError()

    def begin_shutdown(self) -> None:
        """Stop taking work: /ready and new requests answer 503, running background jobs go back to the
        queue at once, running interactive requests get TEXTGEN_SHUTDOWN_GRACE_S. Idempotent."""
        if self.drain_task is not None:
            return
        self.shutting_down = True
        self.runner.stop_claiming()
        logger.info("Shutting down: returning running jobs to the queue, draining requests")
        self.drain_task = asyncio.get_running_loop().create_task(self._drain(), name="textgen-drain")

    async def _drain(self) -> None:
        if self.batches is not None:
            await self.batches.stop()
        await self.runner.stop()
        await self.registry.stop(self.settings.shutdown_grace_s)

    async def refresh_gauges(self) -> None:
        """Queue lengths and job counts are read, not counted as they change."""
        self.metrics.set_engine_stats(self.registry.engine_stats())
        self.metrics.set_job_counts({state.value: await self.store.count(state) for state in JobState})

    async def refresh_gauges_forever(self, every_s: float = GAUGE_REFRESH_S) -> None:
        # With several workers, /metrics is answered by one of them; the others' gauges must not go stale.
        failing: str | None = None  # an unexpected failure is logged when it starts, not every round
        while True:
            try:
                await self.refresh_gauges()
                failing = None
            except (StoreUnavailableError, InsufficientStorageError):
                pass  # the store logged the condition once (textgen.storage.conditions)
            except Exception as error:
                if failing != repr(error):
                    logger.exception("Refreshing metrics gauges failed (logged again only if the error changes)")
                failing = repr(error)
            await asyncio.sleep(every_s)


def job_webhooks(settings: Settings, store: JobStore, owner: str, service: GenerationService) -> JobWebhooks | None:
    """Deliveries need the signing secret; without it callback URLs are refused at submission."""
    sender = sender_from_settings(settings)
    if sender is None:
        return None
    return JobWebhooks(
        store,
        owner,
        sender,
        view=job_payload,
        retry_for_s=settings.webhook_retry_for_s,
        poll_interval_s=settings.job_poll_interval_s,
        observe=service.metrics.observe_webhook,
    )


def model_specs(settings: Settings) -> list[ModelSpec]:
    """TEXTGEN_MODELS as specs, the default first: it answers to TEXTGEN_MODEL_ALIASES too, and a model read
    from a GGUF file to the file's stem."""
    specs = []
    for index, (name, source) in enumerate(settings.model_sources):
        aliases = list(settings.model_aliases) if index == 0 else []
        if source.endswith(".gguf"):
            aliases.append(Path(source).stem)
        elif source == BUNDLED:  # the names a client may know it by, as when it is served alone
            aliases.append(BUNDLED_NAME)
            with contextlib.suppress(ModelLoadError):  # not installed: its load says so, with the fix
                aliases.append(find_bundled_gguf().stem)
        specs.append(ModelSpec(name, source, tuple(dict.fromkeys(a for a in aliases if a and a != name))))
    return specs


def model_settings(settings: Settings, spec: ModelSpec | None) -> Settings:
    """The settings one model loads and runs with: TEXTGEN_MODELS' source and name in place of TEXTGEN_MODEL's."""
    if spec is None:
        return settings
    return settings.model_copy(update={"model": spec.source, "model_name": spec.name, "models": []})


def serving_builder(
    settings: Settings,
    model_loader: ModelLoader,
    content_filter: ContentFilter,
    metrics: Metrics,
    rate_limiter: RateLimiter,
    engine_factory: EngineFactory = create_engine,
) -> Callable[[ModelSpec | None], Awaitable[Serving]]:
    """Loads one model and starts its engine and generation service (the registry's ``build``).

    ``engine_factory`` builds each model's engine: the hook through which every engine of this process
    gets the same core-sharing policy (one per process; its steps then take turns on the cores)."""

    async def build(spec: ModelSpec | None) -> Serving:
        own = model_settings(settings, spec)
        model = await run_in_own_thread(lambda: model_loader(own), name="textgen-load")
        engine = engine_factory(own, model)
        try:
            await engine.start()
        except BaseException:
            await engine.stop(0)
            raise
        core = engine.core_info()
        metrics.set_model(
            model.name,
            str(model.dtype).removeprefix("torch."),
            str(model.device),
            engine.name,
            core=str(core.get("core", "")),
            weights=str(core.get("weights", "")),
        )
        engine.set_step_observer(metrics.observe_step)
        service = GenerationService(
            engine,
            content_filter,
            own,
            model.name,
            metrics,
            rate_limiter,
            tokenizer=model.tokenizer,
            context_length=model.context_length,
        )
        return Serving(model, engine, service)

    return build


async def close_serving(serving: Serving, grace_s: float) -> None:
    """Stop an unloaded model's engine (its running requests get ``grace_s``) and free what it held."""
    await serving.engine.stop(grace_s)
    serving.service.close()
    await asyncio.to_thread(gc.collect)  # the weights' tensors sit in reference cycles of the model objects
    return_free_memory_to_the_system()


async def build_registry(
    settings: Settings,
    build: Callable[[ModelSpec | None], Awaitable[Serving]],
    metrics: Metrics,
    cores: CoreSharing | None = None,
) -> ModelRegistry:
    """The models this server serves, the default loaded (start-up waits for it and fails with its error).

    With TEXTGEN_MODEL alone the model's name is known only once it is loaded (TEXTGEN_MODEL_NAME, else the
    model's own), so it is loaded first and the registry built around it."""
    specs = model_specs(settings)
    preloaded: Serving | None = None
    if not specs:
        preloaded = await build(None)
        served = served_models(settings, preloaded.model)
        specs = [ModelSpec(served.name, settings.model, served.aliases)]

    async def build_named(spec: ModelSpec) -> Serving:
        return await build(spec if settings.models else None)

    def observe(entry: ModelEntry, reason: str) -> None:
        metrics.observe_model(entry.name, entry.state.value, reason, entry.memory_bytes)

    registry = ModelRegistry(
        specs,
        build_named,
        close_serving,
        measured_bytes,
        keep_alive_s=settings.model_keep_alive_s,
        memory_budget=int(settings.model_memory),
        min_residency_s=settings.model_min_residency_s,
        on_change=observe,
        cores=cores if cores is not None else NoCoreSharing(),
    )
    try:
        await registry.start(preloaded)
    except ModelUnavailableError as error:
        cause = error.__cause__
        if isinstance(cause, ConfigError):  # a bad model setting: the clear start-up message, not a 503's
            raise cause from None
        raise
    return registry


async def build_state(
    settings: Settings,
    model_loader: ModelLoader = load_model,
) -> AppState:
    """Open the job store first (cheap, fails fast), then load the default model and start its engine (the
    others load on first use: ``textgen.services.model_registry``). The job kinds besides plain background
    jobs (batch lines: ``JOB_EXECUTORS``) are registered here."""
    content_filter = ContentFilter.from_sources(settings.blocked_words, settings.blocked_words_file)
    access = AccessPolicy.from_settings(settings)
    warn_if_exposed_without_keys(access, bind_host_from_argv())
    warn_about_short_keys(access)
    backends = build_backends(settings)
    store, rate_limiter = backends.store, backends.rate_limiter
    await backends.open()
    metrics = Metrics()
    try:
        # One CoreShare per process: every model's engine gets it, so their steps take turns on a team
        # sized to the cores other processes leave free (textgen.cpu_share).
        cores = cores_from_settings(settings)
        logger.info("Model step threads: %s; %d usable cores", cores.describe(), cores.sizer.cores)
        build = serving_builder(
            settings,
            model_loader,
            content_filter,
            metrics,
            rate_limiter,
            engine_factory=lambda own, model: create_engine(own, model, cores),
        )
        registry = await build_registry(settings, build, metrics, cores)
    except BaseException:
        await backends.close()
        raise
    default = registry.default_serving
    model, engine, service = default.model, default.engine, default.service
    owner = process_owner_id()
    runner = JobRunner(
        store,
        service,
        RunnerConfig.from_settings(settings),
        owner=owner,
        webhooks=job_webhooks(settings, store, owner, service),
        executors={
            kind: factory(service, registry) for kind, factory in {**JOB_EXECUTORS, **RESPONSE_EXECUTORS}.items()
        },
        service_for=registry.service_for,
    )
    await runner.start()
    batches = await start_batches(
        settings,
        backends.batches,
        store,
        runner,
        sender=sender_from_settings(settings),
        service=service,
        planner=batch_line_planner(service, registry),
    )
    logger.info(
        "Service ready: model=%s%s engine=%s job_store=%s worker=%s",
        model.name,
        f" (default of {len(registry.entries)}: {', '.join(registry.entries)})" if len(registry.entries) > 1 else "",
        engine.name,
        backends.url.redacted,
        owner,
    )
    state = AppState(
        settings,
        model,
        engine,
        store,
        runner,
        service,
        metrics,
        access,
        registry,
        failed_keys=FailedKeyLimiter(settings.auth_failures_per_minute),
        streams=StreamSlots(settings.max_streams_per_caller),
    )
    state.gauge_task = asyncio.create_task(state.refresh_gauges_forever(), name="textgen-metrics-gauges")
    state.batches = batches
    state.backends = backends
    return state


async def shutdown_state(state: AppState) -> None:
    """Drain (see ``AppState.begin_shutdown``), then close what the service opened."""
    state.begin_shutdown()
    assert state.drain_task is not None
    await state.drain_task
    if state.gauge_task is not None:
        state.gauge_task.cancel()
    if state.backends is not None:
        await state.backends.close()
    else:  # a state assembled by hand (tests): what it holds
        await state.store.close()
        await state.service.rate_limiter.close()
    state.service.close()
    mark_process_dead()
    logger.info("Shutdown complete")


# After the grace period the engine has failed what still ran; the streams then send their final event.
STREAMS_CLOSE_TIMEOUT_S = 5.0


async def wait_for_streams(state: AppState, timeout_s: float = STREAMS_CLOSE_TIMEOUT_S) -> None:
    """Until every open event stream has ended (sent its final event), at most ``timeout_s``."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while state.streams.total and asyncio.get_running_loop().time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.02)


@contextmanager
def drain_on_signals(state: AppState) -> Iterator[None]:
    """On SIGTERM/SIGINT drain first, then let the server's own handler run.

    The server (uvicorn) closes its listening socket as soon as its handler runs and cuts open event
    streams. So the first signal only starts the drain: the port stays open and new requests get 503 +
    Retry-After (``/ready`` too, so a load balancer stops sending), running background jobs go back to the
    queue, and running requests and open streams get TEXTGEN_SHUTDOWN_GRACE_S; when that runs out the
    engine fails what is left, and each stream ends with its final event. Only then is the server's
    handler called: it stops listening, waits for the last responses and runs the lifespan's shutdown. A
    second signal during the drain goes to the server's handler at once (uvicorn: a second Ctrl-C forces
    the exit).
    """
    loop = asyncio.get_running_loop()
    previous: dict[int, Any] = {}
    handed_over: list[asyncio.Task[None]] = []

    def chain(signum: int, frame: FrameType | None) -> None:
        prior = previous.get(signum)
        if callable(prior):
            prior(signum, frame)

    async def drain_then_exit(signum: int) -> None:
        try:
            assert state.drain_task is not None
            await asyncio.shield(state.drain_task)
            await wait_for_streams(state)
        finally:
            chain(signum, None)

    def start(signum: int) -> None:
        if state.drain_task is not None:  # a second signal: the server's handler now
            chain(signum, None)
            return
        state.begin_shutdown()
        handed_over.append(loop.create_task(drain_then_exit(signum), name="textgen-drain-then-exit"))

    def handle(signum: int, frame: FrameType | None) -> None:
        loop.call_soon_threadsafe(start, signum)

    try:
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, handle)
    except ValueError:  # not the main thread (an embedding test harness): nothing to chain
        pass
    try:
        yield
    finally:
        for number, prior in previous.items():
            signal.signal(number, prior)
