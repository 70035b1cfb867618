"""Everything the service builds at start-up, in one object, and the order it is torn down in."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from textgen.config import Settings
from textgen.content_filter import ContentFilter
from textgen.engine import Engine, create_engine
from textgen.generation import GenerationService
from textgen.jobs.runner import JobRunner
from textgen.jobs.store import JobStore, job_store_from_url
from textgen.loader import LoadedModel, load_model

logger = logging.getLogger(__name__)

ModelLoader = Callable[[Settings], LoadedModel]


@dataclass
class AppState:
    settings: Settings
    model: LoadedModel
    engine: Engine
    store: JobStore
    runner: JobRunner
    service: GenerationService
    shutting_down: bool = False

    @property
    def ready(self) -> bool:
        return self.engine.ready and not self.shutting_down


async def build_state(settings: Settings, model_loader: ModelLoader = load_model) -> AppState:
    """Open the job store first (cheap, fails fast), then load the model and start the engine."""
    content_filter = ContentFilter.from_sources(settings.blocked_words, settings.blocked_words_file)
    store = job_store_from_url(settings.job_store)
    await store.open()
    try:
        model = await asyncio.to_thread(model_loader, settings)
        engine = create_engine(settings, model)
        await engine.start()
    except BaseException:
        await store.close()
        raise
    service = GenerationService(engine, content_filter, settings, model.name)
    runner = JobRunner(
        store,
        service,
        concurrency=settings.job_concurrency,
        poll_interval_s=settings.job_poll_interval_s,
        ttl_s=settings.job_ttl_s,
    )
    await runner.start()
    logger.info("Service ready: model=%s engine=%s job_store=%s", model.name, engine.name, settings.job_store)
    return AppState(settings, model, engine, store, runner, service)


async def shutdown_state(state: AppState) -> None:
    """Background jobs go back to the queue at once; interactive requests get the grace period."""
    state.shutting_down = True
    logger.info("Shutting down: returning running jobs to the queue, draining requests")
    await state.runner.stop()
    await state.engine.stop(state.settings.shutdown_grace_s)
    await state.store.close()
    logger.info("Shutdown complete")
