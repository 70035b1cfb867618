"""Liveness and readiness."""

from __future__ import annotations

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
    return ReadyResponse(model=state.model.name, engine=state.engine.name)
