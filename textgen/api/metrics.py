"""Prometheus scrape endpoint."""

from __future__ import annotations

from fastapi import APIRouter, Response

from textgen.api.deps import StateDep
from textgen.api.errors import error_responses

router = APIRouter(tags=["health"])


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}, **error_responses()},
    summary="Prometheus metrics (textgen_*)",
)
async def metrics(state: StateDep) -> Response:
    await state.refresh_gauges()
    return Response(state.metrics.render(), media_type=state.metrics.content_type)
