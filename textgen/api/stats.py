"""``GET /stats``: how busy the server is right now, as JSON (the playground's live panel reads it).

The same numbers as the Prometheus gauges, without parsing Prometheus text in a browser. Like every
API route it counts against the caller's request limit (``main.create_app``)."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, Field

from textgen.api.deps import StateDep
from textgen.api.errors import error_responses
from textgen.jobs.store import JobState
from textgen.services.model_registry import ModelEntry

router = APIRouter(tags=["health"])


class ModelStats(BaseModel):
    name: str
    state: str = Field(..., description="unloaded, loading, loaded, unloading or failed.")
    default: bool = Field(..., description="The model requests without 'model' run on (loaded at start, kept).")
    memory_bytes: int | None = Field(..., description="While loaded: weights and reserved KV cache.")
    running: int = Field(..., description="Its sequences in the running batch.")
    waiting: int = Field(..., description="Its requests waiting for a batch slot (interactive and background).")
    tokens_per_s: float = Field(..., description="Its recent generated tokens per second.")
    kv_blocks_total: int = Field(0, description="Its paged KV cache's blocks (0: unloaded, or a core without one).")
    kv_blocks_used: int = Field(0, description="Its KV blocks held by sequences now.")


class StatsResponse(BaseModel):
    ready: bool = Field(..., description="Model loaded and warmed up, not shutting down (as /ready).")
    model: str = Field(..., description="The default model (TEXTGEN_MODELS' first, or TEXTGEN_MODEL).")
    engine: str = Field(..., description="'batched' or 'threadpool'.")
    running: int = Field(..., description="Sequences in the running batch now: the size of the next decode step.")
    max_running: int = Field(..., description="Batch capacity (TEXTGEN_MAX_RUNNING).")
    waiting_interactive: int = Field(..., description="Interactive requests waiting for a batch slot.")
    waiting_background: int = Field(..., description="Background jobs handed to the engine, waiting for a slot.")
    tokens_per_s: float = Field(..., description="Recent generated tokens per second over the whole batch.")
    jobs_queued: int = Field(..., description="Background jobs queued in the job store (all workers).")
    jobs_running: int = Field(..., description="Background jobs running (all workers).")
    models: list[ModelStats] = Field(
        default_factory=list, description="Every configured model (the engine numbers above are their sums)."
    )
    prefix_cache_hit_rate: float | None = Field(
        None,
        description="Share of prompt tokens served from the prefix cache since start (this worker); null when "
        "the prefix cache is off.",
    )
    prefix_cache_hit_tokens: int = Field(0, description="Prompt tokens served from the prefix cache since start.")
    kv_blocks_total: int = Field(
        0,
        description="Blocks of the paged KV cache (TEXTGEN_KV_CACHE_MEMORY / TEXTGEN_KV_BLOCK_SIZE), all loaded "
        "models; 0 on a core without one.",
    )
    kv_blocks_used: int = Field(
        0,
        description="KV blocks held by running sequences now (the rest are free, cached prefixes among them: "
        "evicted when needed). Admission waits, and background sequences are preempted, when they run short.",
    )
    preemptions: int = Field(0, description="Sequences preempted for KV blocks since start (they resume later).")


@router.get(
    "/stats",
    response_model=StatsResponse,
    responses=error_responses(503, 500),
    summary="Live engine and queue numbers as JSON (running and waiting sequences, tokens/s, batch size)",
)
async def stats(state: StateDep) -> StatsResponse:
    engine = state.registry.engine_stats()
    return StatsResponse(
        ready=state.ready,
        model=state.model.name,
        engine=state.engine.name,
        running=engine.running,
        max_running=state.settings.max_running,
        waiting_interactive=engine.waiting_interactive,
        waiting_background=engine.waiting_background,
        tokens_per_s=round(engine.tokens_per_s, 2),
        jobs_queued=await state.store.count(JobState.QUEUED),
        jobs_running=await state.store.count(JobState.RUNNING),
        prefix_cache_hit_rate=_hit_rate(engine.prefix_query_tokens, engine.prefix_hit_tokens),
        prefix_cache_hit_tokens=engine.prefix_hit_tokens,
        kv_blocks_total=engine.kv_blocks_total,
        kv_blocks_used=engine.kv_blocks_used,
        preemptions=engine.preemptions,
        models=[model_stats(entry) for entry in state.registry.entries.values()],
    )


def model_stats(entry: ModelEntry) -> ModelStats:
    serving = entry.serving
    engine = serving.engine.stats() if serving is not None else None
    return ModelStats(
        name=entry.name,
        state=entry.state.value,
        default=entry.pinned,
        memory_bytes=entry.memory_bytes if serving is not None else None,
        running=engine.running if engine else 0,
        waiting=engine.waiting_interactive + engine.waiting_background if engine else 0,
        tokens_per_s=round(engine.tokens_per_s, 2) if engine else 0.0,
        kv_blocks_total=engine.kv_blocks_total if engine else 0,
        kv_blocks_used=engine.kv_blocks_used if engine else 0,
    )


def _hit_rate(queried: int | None, hits: int) -> float | None:
    if queried is None:
        return None
    return round(hits / queried, 4) if queried else 0.0
