"""The generation engine: contract in ``types``; implementations in ``scheduler`` (continuous batching,
TEXTGEN_ENGINE=batched) and ``threadpool`` (the baseline, TEXTGEN_ENGINE=threadpool)."""

from __future__ import annotations

from textgen.config import Settings
from textgen.cpu_share import CoreShare
from textgen.engine.core import CoreOptions, sequence_positions
from textgen.engine.scheduler import BatchedEngine
from textgen.engine.threadpool import ThreadPoolEngine
from textgen.engine.types import (
    Engine,
    EngineLimits,
    FinishReason,
    GenerationRequest,
    GenerationResult,
    Handle,
    Priority,
    SamplingParams,
    SpeculationMode,
    SpeculationSettings,
)
from textgen.loader import LoadedModel

__all__ = [
    "BatchedEngine",
    "Engine",
    "EngineLimits",
    "FinishReason",
    "GenerationRequest",
    "GenerationResult",
    "Handle",
    "Priority",
    "SamplingParams",
    "ThreadPoolEngine",
    "core_options_from_settings",
    "cores_from_settings",
    "create_engine",
    "limits_from_settings",
]


def limits_from_settings(settings: Settings) -> EngineLimits:
    return EngineLimits(
        max_running=settings.max_running,
        max_waiting=settings.max_waiting,
        max_prompt_tokens=settings.max_prompt_tokens,
        max_new_tokens_limit=settings.max_new_tokens_limit,
        max_prefill_tokens=settings.max_prefill_tokens,
        prefill_step_tokens=settings.prefill_step_tokens,
        background_share=settings.background_share,
        embedding_step_share=settings.embedding_step_share,
        speculation=SpeculationSettings(
            SpeculationMode(settings.speculative), settings.speculative_tokens, settings.speculative_max_batch
        ),
        prefill_chunk_tokens=settings.prefill_chunk_tokens,
        prefix_cache=settings.prefix_cache,
        prefix_cache_shared=settings.prefix_cache_shared,
    )


def create_engine(settings: Settings, loaded: LoadedModel, cores: CoreShare | None = None) -> Engine:
    """``cores``: the process's CoreShare; every engine of one process must get the same one (its steps then
    take turns on a team sized to the free cores). None builds one from the settings for this engine alone."""
    limits = limits_from_settings(settings)
    if settings.engine == "threadpool":
        return ThreadPoolEngine(loaded, limits, workers=settings.threadpool_workers, warmup=settings.warmup)
    # The server loads the model for this engine alone, so the engine may free what its core duplicates.
    return BatchedEngine(
        loaded,
        limits,
        core_options=core_options_from_settings(settings),
        warmup=settings.warmup,
        owns_model=True,
        cores=cores if cores is not None else cores_from_settings(settings),
    )


def cores_from_settings(settings: Settings) -> CoreShare:
    """The process's CoreShare (textgen.cpu_share): build one per process, pass it to every engine."""
    return CoreShare.for_process(settings.torch_threads, settings.adaptive_threads)


def core_options_from_settings(settings: Settings) -> CoreOptions:
    return CoreOptions(
        core=settings.core,
        weights=settings.weights,
        slots=settings.max_running + EngineLimits.embedding_slots,
        positions=sequence_positions(settings.max_prompt_tokens, settings.max_new_tokens_limit),
        kv_cache_memory=None if settings.kv_cache_memory is None else int(settings.kv_cache_memory),
        kv_cache_memory_fraction=settings.kv_cache_memory_fraction,
        kv_block_size=settings.kv_block_size,
        cache_dir=settings.cache_dir,
        fused=settings.fused_kernels,
    )
