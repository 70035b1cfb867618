"""Liveness and readiness."""

from __future__ import annotations

from collections.abc import Mapping

from fastapi import APIRouter

from models import HealthResponse, ReadyResponse
from textgen.api.deps import StateDep
from textgen.api.errors import error_responses
from textgen.errors import NotReadyError

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
    summary="Readiness: model loaded and warmed up, not shutting down",
)
async def ready(state: StateDep) -> ReadyResponse:
    if not state.ready:
        raise NotReadyError()
    details = core_details(state.engine.core_info())
    return ReadyResponse(model=state.model.name, engine=state.engine.name, details=details)


def core_details(core: Mapping[str, object]) -> dict[str, str]:
    """The core's description as /ready shows it: a fused-kernel fallback names its reason (a refused kernel
    folder must not slow the server down unseen)."""
    details = {key: str(core[key]) for key in ("core", "weights") if key in core}
    if "fused_kernels" in core:
        details["fused_kernels"] = "on" if core["fused_kernels"] else f"off: {core.get('fused_kernels_off', '')}"
    return details
