"""FastAPI dependencies as ``Annotated`` aliases: routes declare what they need, nothing global."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from textgen.api.errors import request_id_of
from textgen.errors import NotReadyError
from textgen.generation import GenerationService
from textgen.jobs.runner import JobRunner
from textgen.jobs.store import JobStore
from textgen.state import AppState


def get_state(request: Request) -> AppState:
    state: AppState | None = getattr(request.app.state, "textgen", None)
    if state is None:
        raise NotReadyError()
    return state


def get_ready_state(state: Annotated[AppState, Depends(get_state)]) -> AppState:
    if not state.ready:
        raise NotReadyError()
    return state


def get_service(state: Annotated[AppState, Depends(get_ready_state)]) -> GenerationService:
    return state.service


async def admit_caller(request: Request, service: Annotated[GenerationService, Depends(get_service)]) -> str:
    """The caller's principal (set by the API-key middleware), counted against its rate limit."""
    principal = str(request.scope.get("state", {}).get("principal", "anonymous"))
    await service.admit(principal)
    return principal


def get_store(state: Annotated[AppState, Depends(get_state)]) -> JobStore:
    return state.store


def get_runner(state: Annotated[AppState, Depends(get_state)]) -> JobRunner:
    return state.runner


StateDep = Annotated[AppState, Depends(get_state)]
ServiceDep = Annotated[GenerationService, Depends(get_service)]
StoreDep = Annotated[JobStore, Depends(get_store)]
RunnerDep = Annotated[JobRunner, Depends(get_runner)]
RequestIdDep = Annotated[str, Depends(request_id_of)]
CallerDep = Annotated[str, Depends(admit_caller)]
