"""FastAPI dependencies as ``Annotated`` aliases: routes declare what they need, nothing global."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from textgen.access import Caller, caller_of
from textgen.api.errors import request_id_of
from textgen.errors import NotReadyError
from textgen.generation import GenerationService
from textgen.jobs.store import JobStore
from textgen.state import AppState
from textgen.workers.runner import JobRunner


def get_state(request: Request) -> AppState:
    state: AppState | None = getattr(request.app.state, "textgen", None)
    if state is None:
        raise NotReadyError()
    return state


def get_ready_state(state: Annotated[AppState, Depends(get_state)]) -> AppState:
    if not state.ready:
        raise state.not_ready()
    return state


def get_service(state: Annotated[AppState, Depends(get_ready_state)]) -> GenerationService:
    return state.service


def get_caller(request: Request) -> Caller:
    """Who is calling (identified by the API-key middleware; see ``textgen.access``)."""
    return caller_of(request.scope)


def get_owner_id(request: Request) -> str:
    """The caller's owner id: store everything the caller creates under it, and show the caller only
    what carries it (404 otherwise). Admins: see ``Caller.visible_owner``."""
    return caller_of(request.scope).owner_id


async def count_request(request: Request) -> None:
    """Count the request against its caller's request limit (TEXTGEN_RATE_LIMIT_RPM; 429 when over it).

    ``main.create_app`` puts this on every API router, so every API route counts exactly once, reads and
    listings included; only the probes and the static pages are left out (``UNMETERED_ROUTERS`` there)."""
    state: AppState | None = getattr(request.app.state, "textgen", None)
    if state is None:  # not started: the route answers 503 itself
        return
    await state.service.admit(caller_of(request.scope).rate_key)


async def admit_caller(request: Request, _service: Annotated[GenerationService, Depends(get_service)]) -> str:
    """The caller's rate-limit key (``Caller.rate_key``): what its tokens are charged to. The request
    itself was counted by ``count_request``."""
    return caller_of(request.scope).rate_key


async def admit_reader(request: Request) -> Caller:
    """The caller of a read (job status, listing, stream); counted by ``count_request`` like any request."""
    return caller_of(request.scope)


def get_store(state: Annotated[AppState, Depends(get_state)]) -> JobStore:
    return state.store


def get_runner(state: Annotated[AppState, Depends(get_state)]) -> JobRunner:
    return state.runner


StateDep = Annotated[AppState, Depends(get_state)]
ServiceDep = Annotated[GenerationService, Depends(get_service)]
StoreDep = Annotated[JobStore, Depends(get_store)]
RunnerDep = Annotated[JobRunner, Depends(get_runner)]
RequestIdDep = Annotated[str, Depends(request_id_of)]
CallerDep = Annotated[str, Depends(admit_caller)]  # the rate key of a model-using route (needs a ready model)
CallerIdentityDep = Annotated[Caller, Depends(get_caller)]
OwnerDep = Annotated[str, Depends(get_owner_id)]
ReaderDep = Annotated[Caller, Depends(admit_reader)]
