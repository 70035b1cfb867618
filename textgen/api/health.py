"""Liveness and readiness."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from fastapi import APIRouter

from textgen.api.deps import StateDep
from textgen.api.errors import error_responses
from textgen.api.schemas.native import HealthResponse, ReadyResponse
from textgen.errors import InsufficientStorageError, StoreUnavailableError
from textgen.jobs.store import JobState
from textgen.state import AppState

# A store that does not answer a one-key read within this is as good as down for a readiness probe.
STORE_PROBE_TIMEOUT_S = 2.0

router = APIRouter(tags=["health"])


@router.get(
    "/health", response_model=HealthResponse, responses=error_responses(), summary="Liveness: the process answers"
)
async def health() -> HealthResponse:
    return HealthResponse()


@router.get(
    "/ready",
    response_model=ReadyResponse,
    responses=error_responses(503),
    summary="Readiness: model loaded and warmed up, job store reachable, not shutting down",
)
async def ready(state: StateDep) -> ReadyResponse:
    if not state.ready:
        raise state.not_ready()
    await check_store(state)
    details = core_details(state.engine.core_info())
    return ReadyResponse(model=state.model.name, engine=state.engine.name, details=details)


def core_details(core: Mapping[str, object]) -> dict[str, str]:
    """The core's description as /ready shows it: a fused-kernel fallback names its reason (a refused kernel
    folder must not slow the server down unseen)."""
    details = {key: str(core[key]) for key in ("core", "weights") if key in core}
    if "fused_kernels" in core:
        details["fused_kernels"] = "on" if core["fused_kernels"] else f"off: {core.get('fused_kernels_off', '')}"
    return details


async def check_store(state: AppState) -> None:
    """503 naming the condition when the job store does not answer a read (Redis down, SQLite locked).

    A store that refuses only writes (full disk, Redis out of memory) stays ready: generation and reads
    work, and job submissions answer 507 naming the fix. The answer names the kind of failure but not the
    store's address (/ready needs no API key); the log line of the condition has the details."""
    try:
        await asyncio.wait_for(state.store.count(JobState.QUEUED), STORE_PROBE_TIMEOUT_S)
    except InsufficientStorageError:
        return
    except StoreUnavailableError as error:
        cause = type(error.__cause__).__name__ if error.__cause__ is not None else "unavailable"
        raise StoreUnavailableError(
            f"Not ready: the job store is unavailable ({cause}); the server log names the cause and the fix. "
            "Retry after the time in the Retry-After header."
        ) from error
    except TimeoutError as error:
        raise StoreUnavailableError(
            f"Not ready: the job store did not answer within {STORE_PROBE_TIMEOUT_S:.0f} s. Retry after the time "
            "in the Retry-After header."
        ) from error
