"""The OpenAI Batch API on the durable job store: file storage, the batch store and its coordinator.

``open_batches`` builds what start-up needs; the routes are ``textgen.api.files`` and
``textgen.api.batches``; each batch line runs as a job through the ordinary job runner.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from textgen.batches.coordinator import BatchCoordinator, LinePlanner
from textgen.batches.files import FileStorage
from textgen.batches.redis_store import RedisBatchStore
from textgen.batches.sqlite_store import SQLiteBatchStore
from textgen.batches.store import BatchStore
from textgen.batches.webhook import BatchWebhooks
from textgen.config import Settings
from textgen.generation import GenerationService
from textgen.jobs.runner import JobRunner
from textgen.jobs.store import JobStore
from textgen.storage.url import is_redis_url, sqlite_path_from_url

logger = logging.getLogger(__name__)


@dataclass
class Batches:
    store: BatchStore
    files: FileStorage
    coordinator: BatchCoordinator

    async def stop(self) -> None:
        await self.coordinator.stop()

    async def close(self) -> None:
        await self.store.close()


def batch_store_from_url(url: str) -> BatchStore:
    """The batch store beside the job store named by ``TEXTGEN_JOB_STORE`` (same file, or same Redis)."""
    if is_redis_url(url):
        return RedisBatchStore(url.strip())
    return SQLiteBatchStore(sqlite_path_from_url(url))


def files_dir_for(job_store_url: str, configured: Path | None) -> Path:
    """Where uploaded and output files live: ``TEXTGEN_FILES_DIR`` if set; else, for SQLite, a folder
    beside the database file; for Redis, ``data/files`` (replicas on several machines must point
    ``TEXTGEN_FILES_DIR`` at one shared mount)."""
    if configured is not None:
        return configured if configured.is_absolute() else Path.cwd() / configured
    if is_redis_url(job_store_url):
        return Path.cwd() / "data" / "files"
    db = sqlite_path_from_url(job_store_url)
    return db.parent / f"{db.stem}-files"


def batch_webhooks(settings: Settings) -> BatchWebhooks | None:
    if not settings.webhook_secret:
        return None
    return BatchWebhooks(
        secret=settings.webhook_secret,
        timeout_s=settings.webhook_timeout_s,
        retry_for_s=settings.webhook_retry_for_s,
        allow_private=settings.webhook_allow_private,
    )


async def open_batches(
    settings: Settings,
    jobs: JobStore,
    runner: JobRunner,
    service: GenerationService | None = None,
    planner: LinePlanner | None = None,
) -> Batches:
    """Open the batch store beside the job store and start this process's coordinator (which charges
    every line to its owner's rate limits through ``service``, planned by ``planner``)."""
    store = batch_store_from_url(settings.job_store)
    await store.open()
    files = FileStorage(files_dir_for(settings.job_store, settings.files_dir))
    files.prepare()
    coordinator = BatchCoordinator(
        store,
        jobs,
        files,
        settings,
        worker=runner.owner,
        notify_runner=runner.notify,
        webhooks=batch_webhooks(settings),
        service=service,
        planner=planner,
    )
    await coordinator.start()
    logger.info("Batches: files kept in %s", files.root)
    return Batches(store, files, coordinator)
