"""The OpenAI Batch API on the durable job store: file storage, the batch store and its coordinator.

``open_batches`` builds what start-up needs; the routes are ``textgen.api.files`` and
``textgen.api.batches``; each batch line runs as a job through the ordinary job runner.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from textgen.batches.coordinator import BatchCoordinator
from textgen.batches.files import FileStorage
from textgen.batches.store import BatchStore, batch_store_from_url, files_dir_for
from textgen.batches.webhook import BatchWebhooks
from textgen.config import Settings
from textgen.jobs.runner import JobRunner
from textgen.jobs.store import JobStore

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


def batch_webhooks(settings: Settings) -> BatchWebhooks | None:
    if not settings.webhook_secret:
        return None
    return BatchWebhooks(
        secret=settings.webhook_secret,
        timeout_s=settings.webhook_timeout_s,
        retry_for_s=settings.webhook_retry_for_s,
        allow_private=settings.webhook_allow_private,
    )


async def open_batches(settings: Settings, jobs: JobStore, runner: JobRunner) -> Batches:
    """Open the batch store beside the job store and start this process's coordinator."""
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
    )
    await coordinator.start()
    logger.info("Batches: files kept in %s", files.root)
    return Batches(store, files, coordinator)
