"""What the Batch API needs at run time: the batch store (opened by ``textgen.backends``), the file
storage and this process's coordinator, started together."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from textgen.batches import files_dir_for
from textgen.batches.files import FileStorage
from textgen.batches.store import BatchStore
from textgen.config import Settings
from textgen.generation import GenerationService
from textgen.jobs.store import JobStore
from textgen.webhooks import WebhookSender
from textgen.workers.coordinator import BatchCoordinator, LinePlanner
from textgen.workers.runner import JobRunner
from textgen.workers.webhooks import BatchWebhooks

logger = logging.getLogger(__name__)


@dataclass
class Batches:
    store: BatchStore
    files: FileStorage
    coordinator: BatchCoordinator

    async def stop(self) -> None:
        await self.coordinator.stop()


async def start_batches(
    settings: Settings,
    store: BatchStore,
    jobs: JobStore,
    runner: JobRunner,
    *,
    sender: WebhookSender | None = None,
    service: GenerationService | None = None,
    planner: LinePlanner | None = None,
) -> Batches:
    """Prepare the file storage and start this process's coordinator over the (open) batch store; it
    charges every line to its owner's rate limits through ``service``, planned by ``planner``, and
    sends batch webhooks through ``sender``."""
    files = FileStorage(files_dir_for(settings.job_store, settings.files_dir))
    files.prepare()
    coordinator = BatchCoordinator(
        store,
        jobs,
        files,
        settings,
        worker=runner.owner,
        notify_runner=runner.notify,
        webhooks=None if sender is None else BatchWebhooks(sender, retry_for_s=settings.webhook_retry_for_s),
        service=service,
        planner=planner,
    )
    await coordinator.start()
    logger.info("Batches: files kept in %s", files.root)
    return Batches(store, files, coordinator)
