"""Prometheus metrics, all named ``textgen_*``, built per app (never at import time).

Single process: one ``CollectorRegistry`` per app. With ``uvicorn --workers N`` set
``PROMETHEUS_MULTIPROC_DIR`` to an empty, writable folder before starting: every worker then writes
its samples there and ``/metrics`` (answered by whichever worker) aggregates all of them.
Gauges that describe a process (queue lengths) are summed over live workers; model info is the max.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from textgen.engine.types import EngineStats, GenerationResult
from textgen.jobs.states import JobState

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256)
JOB_STATES = tuple(state.value for state in JobState)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    """Every metric the service exports; methods named after the event they record."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http_requests = Counter(
            "textgen_http_requests", "HTTP requests by route and status", ["method", "route", "status"], registry=r
        )
        self.http_latency = Histogram(
            "textgen_http_request_duration_seconds",
            "HTTP request latency by route",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.waiting = Gauge(
            "textgen_engine_waiting_sequences",
            "Requests waiting for a batch slot",
            ["priority"],
            multiprocess_mode="livesum",
            registry=r,
        )
        self.running = Gauge(
            "textgen_engine_running_sequences",
            "Sequences in the running batch",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.kv_blocks = Gauge(
            "textgen_kv_cache_blocks",
            "Paged KV cache blocks: total in the pool, used by running sequences",
            ["state"],
            multiprocess_mode="livesum",
            registry=r,
        )
        self.preemptions = Counter(
            "textgen_engine_preemptions",
            "Sequences preempted when the KV cache ran out of blocks (recomputed when blocks free up)",
            registry=r,
        )
        self._preemptions_seen = 0
        self.batch_size = Histogram(
            "textgen_engine_batch_size", "Sequences per decode step", buckets=BATCH_BUCKETS, registry=r
        )
        self.step_duration = Histogram(
            "textgen_engine_step_duration_seconds",
            "Duration of one decode step",
            buckets=TOKEN_LATENCY_BUCKETS,
            registry=r,
        )
        self.generated_tokens = Counter("textgen_generated_tokens", "Tokens generated", registry=r)
        self.prompt_tokens = Counter("textgen_prompt_tokens", "Prompt tokens processed", registry=r)
        self.prefix_cache_queries = Counter(
            "textgen_prefix_cache_queries",
            "Prompt tokens of finished requests, each looked up in the prefix cache (hits / queries: the hit rate)",
            registry=r,
        )
        self.prefix_cache_hits = Counter(
            "textgen_prefix_cache_hits",
            "Prompt tokens served from the prefix cache (keys/values reused, not computed)",
            registry=r,
        )
        self.embedding_inputs = Counter("textgen_embedding_inputs", "Inputs embedded (/v1/embeddings)", registry=r)
        self.embedding_tokens = Counter("textgen_embedding_tokens", "Tokens embedded (/v1/embeddings)", registry=r)
        self.draft_tokens = Counter(
            "textgen_speculative_draft_tokens", "Tokens drafted for speculative decoding (verified)", registry=r
        )
        self.accepted_draft_tokens = Counter(
            "textgen_speculative_accepted_tokens", "Drafted tokens the model agreed with (kept)", registry=r
        )
        self._drafts_seen = (0, 0)  # the engine's totals at the last scrape
        self.requests_finished = Counter(
            "textgen_generation_requests", "Finished generations by finish reason", ["finish_reason"], registry=r
        )
        self.time_to_first_token = Histogram(
            "textgen_time_to_first_token_seconds",
            "Time from arrival to the first generated token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "textgen_inter_token_latency_seconds",
            "Mean time between generated tokens of a request",
            buckets=TOKEN_LATENCY_BUCKETS,
            registry=r,
        )
        self.jobs = Gauge(
            "textgen_jobs", "Jobs in the store by state", ["state"], multiprocess_mode="mostrecent", registry=r
        )
        self.job_queue_wait = Histogram(
            "textgen_job_queue_wait_seconds",
            "Time a background job waited in the store before it started",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.filter_rejections = Counter(
            "textgen_content_filter_rejections",
            "Content-filter hits by where (prompt/output) and action (reject, redact, content_filter)",
            ["where", "action"],
            registry=r,
        )
        self.jobs_reclaimed = Counter(
            "textgen_jobs_reclaimed",
            "Running jobs whose lease expired, by outcome (requeued, or failed after TEXTGEN_JOB_MAX_ATTEMPTS)",
            ["outcome"],
            registry=r,
        )
        self.webhook_deliveries = Counter(
            "textgen_webhook_deliveries",
            "Finished webhook deliveries by outcome (delivered/failed)",
            ["outcome"],
            registry=r,
        )
        self.model_info = Gauge(
            "textgen_model_info",
            "The served model (value is always 1)",
            ["name", "dtype", "device", "engine", "core", "weights"],
            multiprocess_mode="max",
            registry=r,
        )
        # Several models (TEXTGEN_MODELS): each model's state, size, loads, unloads and work.
        self.model_loaded = Gauge(
            "textgen_model_loaded",
            "1 while the model is loaded, else 0",
            ["model"],
            multiprocess_mode="livemax",
            registry=r,
        )
        self.model_memory = Gauge(
            "textgen_model_memory_bytes",
            "Memory of a loaded model (its core's weights and reserved KV cache), 0 when unloaded",
            ["model"],
            multiprocess_mode="livesum",
            registry=r,
        )
        self.model_loads = Counter(
            "textgen_model_loads", "Model loads by outcome (loaded/failed)", ["model", "outcome"], registry=r
        )
        self.model_unloads = Counter(
            "textgen_model_unloads",
            "Model unloads by reason (keep_alive, evicted, over_budget, shutdown)",
            ["model", "reason"],
            registry=r,
        )
        self.model_requests = Counter(
            "textgen_model_generation_requests", "Finished generations by model", ["model"], registry=r
        )
        self.model_generated_tokens = Counter(
            "textgen_model_generated_tokens", "Tokens generated by model", ["model"], registry=r
        )
        self.model_prompt_tokens = Counter(
            "textgen_model_prompt_tokens", "Prompt tokens processed by model", ["model"], registry=r
        )

    # ----- recording ---------------------------------------------------------------------------

    def set_model(self, name: str, dtype: str, device: str, engine: str, core: str = "", weights: str = "") -> None:
        self.model_info.labels(name=name, dtype=dtype, device=device, engine=engine, core=core, weights=weights).set(1)

    def observe_http(self, method: str, route: str, status: int, seconds: float) -> None:
        self.http_requests.labels(method=method, route=route, status=str(status)).inc()
        self.http_latency.labels(method=method, route=route).observe(seconds)

    def observe_step(self, batch_size: int, seconds: float) -> None:
        """Called from the inference thread; prometheus-client metrics are thread-safe."""
        self.batch_size.observe(batch_size)
        self.step_duration.observe(seconds)

    def observe_result(self, result: GenerationResult, model: str | None = None) -> None:
        if model is not None:
            self.model_requests.labels(model=model).inc()
            self.model_generated_tokens.labels(model=model).inc(result.completion_tokens)
            self.model_prompt_tokens.labels(model=model).inc(result.prompt_tokens)
        self.generated_tokens.inc(result.completion_tokens)
        self.prompt_tokens.inc(result.prompt_tokens)
        self.prefix_cache_queries.inc(result.prompt_tokens)
        self.prefix_cache_hits.inc(result.cached_tokens)
        self.requests_finished.labels(finish_reason=result.finish_reason.value).inc()
        ttft = result.timings.time_to_first_token_s
        if ttft is not None:
            self.time_to_first_token.observe(ttft)
            if result.completion_tokens > 1:
                self.inter_token_latency.observe((result.timings.total_s - ttft) / (result.completion_tokens - 1))

    def observe_model(self, model: str, state: str, reason: str, memory_bytes: int | None) -> None:
        """A model's state changed (``textgen.services.model_registry``): loaded, failed, unloaded."""
        self.model_loaded.labels(model=model).set(1 if state == "loaded" else 0)
        self.model_memory.labels(model=model).set(memory_bytes or 0 if state == "loaded" else 0)
        if state in ("loaded", "failed"):
            self.model_loads.labels(model=model, outcome=state).inc()
        elif state == "unloading":
            self.model_unloads.labels(model=model, reason=reason).inc()

    def observe_reclaimed(self, requeued: int, failed: int) -> None:
        if requeued:
            self.jobs_reclaimed.labels(outcome="requeued").inc(requeued)
        if failed:
            self.jobs_reclaimed.labels(outcome="failed").inc(failed)

    def observe_webhook(self, outcome: str) -> None:
        self.webhook_deliveries.labels(outcome=outcome).inc()

    def observe_embeddings(self, inputs: int, tokens: int) -> None:
        self.embedding_inputs.inc(inputs)
        self.embedding_tokens.inc(tokens)

    def observe_filter(self, where: str, action: str) -> None:
        self.filter_rejections.labels(where=where, action=action).inc()

    def observe_job_started(self, created_at: float, started_at: float | None) -> None:
        self.job_queue_wait.observe(max(0.0, (started_at or time.time()) - created_at))

    def set_engine_stats(self, stats: EngineStats) -> None:
        self.running.set(stats.running)
        self.waiting.labels(priority="interactive").set(stats.waiting_interactive)
        self.waiting.labels(priority="background").set(stats.waiting_background)
        drafted, accepted = self._drafts_seen
        self.draft_tokens.inc(max(0, stats.draft_tokens - drafted))
        self.accepted_draft_tokens.inc(max(0, stats.accepted_draft_tokens - accepted))
        self._drafts_seen = (stats.draft_tokens, stats.accepted_draft_tokens)
        self.kv_blocks.labels(state="total").set(stats.kv_blocks_total)
        self.kv_blocks.labels(state="used").set(stats.kv_blocks_used)
        if stats.preemptions > self._preemptions_seen:  # the engine counts; the counter follows
            self.preemptions.inc(stats.preemptions - self._preemptions_seen)
            self._preemptions_seen = stats.preemptions

    def set_job_counts(self, counts: dict[str, int]) -> None:
        for state in JOB_STATES:
            self.jobs.labels(state=state).set(counts.get(state, 0))

    # ----- exposition --------------------------------------------------------------------------

    def render(self) -> bytes:
        if multiprocess_dir() is None:
            return generate_latest(self.registry)
        combined = CollectorRegistry()
        _collect_processes(combined)
        return generate_latest(combined)


# prometheus_client's multiprocess helpers carry no annotations; these typed names are their signatures.
_collect_processes: Callable[[CollectorRegistry], object] = multiprocess.MultiProcessCollector
_mark_dead: Callable[[int], None] = multiprocess.mark_process_dead


def mark_process_dead() -> None:
    """In multiprocess mode, drop this worker's live gauges when it stops."""
    if multiprocess_dir() is not None:
        _mark_dead(os.getpid())
