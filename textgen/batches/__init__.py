"""The OpenAI Batch API's persistence: the batch store (``store``, with SQLite and Redis backends, opened
by ``textgen.backends``) and the uploaded and output files (``files``).

The coordinator that moves batches along is a worker (``textgen.workers.coordinator``, started by
``textgen.workers.batches``); the routes are ``textgen.api.files`` and ``textgen.api.batches``; each
batch line runs as a job through the ordinary job runner.
"""

from __future__ import annotations

from pathlib import Path

from textgen.storage.url import is_redis_url, sqlite_path_from_url


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
