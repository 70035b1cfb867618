"""The one settings class. Every knob is an env var with the ``TEXTGEN_`` prefix.

Settings are read once, in the FastAPI lifespan (or by a test building its own ``Settings``), never at
import time. ``load_settings`` turns pydantic's validation errors into a ``ConfigError`` whose message
names each offending env var and what it accepts, so a bad deployment fails at start-up with a fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import ByteSize, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from textgen.errors import ConfigError

ENV_PREFIX = "TEXTGEN_"

MAX_MODEL_NAME_CHARS = 256
CommaList = Annotated[list[str], NoDecode]

DEFAULT_BLOCKED_WORDS = ("hate", "hateful*", "hatred*", "violen*")
# Settings that also accept a ``*_FILE`` variant holding the value (API keys files are lists instead).
SECRET_FILE_SETTINGS = ("webhook_secret", "job_store")
# Never echoed in a validation error (their values are secrets, or URLs that may hold one).
SECRET_SETTINGS = frozenset({"api_keys", "admin_api_keys", "webhook_secret", "job_store"})


def read_secret_file(path: Path, setting: str) -> str:
    """The file's content without surrounding whitespace (a trailing newline is usual); ValueError
    naming ``setting`` if it cannot be read or is empty. The content is never part of the message."""
    try:
        value = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not UTF-8"
        raise ValueError(f"{setting}={path} cannot be read ({reason})") from None
    if not value:
        raise ValueError(f"{setting}={path} is empty")
    return value


def _split_commas(value: Any) -> Any:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    """Service configuration; docs/configuration.md lists every variable (python -m scripts.gen_docs)."""

    # A ``.env`` file in the working directory is read too; real environment variables win over it.
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="ignore", frozen=True, env_file=".env", env_file_encoding="utf-8"
    )

    # Model
    model: str = Field("bundled", description="'bundled', a local folder, or a Hugging Face hub id.")
    model_name: str | None = Field(None, description="Name reported in responses; defaults from the model.")
    model_aliases: CommaList = Field(
        ["default"],
        description="Other names /v1 requests may give in 'model' for the served model (comma-separated; the "
        "GGUF file's stem is one too); GET /v1/models lists them; any other name is 404 model_not_found.",
    )
    models: CommaList = Field(
        default_factory=list,
        description="Several models in one server: 'name=source' pairs, comma-separated (e.g. "
        "'smol=bundled,gemma=/models/gemma-3-270m-q4_k_m.gguf'; a source is what TEXTGEN_MODEL takes). Requests "
        "choose one by 'model'; the first is the default, loaded at start and kept; the others load on first use. "
        "Empty: TEXTGEN_MODEL alone.",
    )
    model_keep_alive_s: float = Field(
        300.0,
        description="A model other than the default is unloaded after this many seconds without requests "
        "(0: as soon as it is idle; negative: never).",
    )
    model_memory: ByteSize = Field(
        ByteSize(0),
        ge=0,
        description="Memory all loaded models may take together (bytes, or '8GiB', '512MB'); loading one more "
        "unloads the least recently used idle models first (0 = no limit).",
    )
    model_min_residency_s: float = Field(
        30.0,
        ge=0,
        description="A model stays loaded at least this many seconds before it is unloaded to make room for "
        "another under TEXTGEN_MODEL_MEMORY; meanwhile a request for a model that does not fit gets 503 with "
        "Retry-After instead of loads evicting each other (0: evict at once). Keep-alive unloading is not held.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="'auto': bfloat16 on a GPU or a CPU with AVX-512 BF16/AMX, else float32."
    )
    device: str = Field("auto", description="'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1'.")
    cache_dir: Path = Field(Path.home() / ".cache" / "textgen", description="Converted bundled weights.")
    gguf_load: Literal["auto", "direct", "convert"] = Field(
        "auto",
        description="How a GGUF model is loaded. 'direct': tensors, tokenizer and chat template read from the file, "
        "projections kept in the file's block formats (Llama, Mistral, Qwen2/3, Gemma 3, Phi-3 files); 'convert': "
        "de-quantized once into a cached float copy loaded by transformers; 'auto': direct, except the bundled "
        "model, whose measured path (Q4_1 blocks plus a calibrated format for large batches) stays 'convert'.",
    )
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads of every model step, fixed (TEXTGEN_ADAPTIVE_THREADS then has no effect); "
        "default: sized to the free cores.",
    )
    adaptive_threads: bool = Field(
        False,
        description="Size each model step's threads to the cores other processes leave free (re-measured every "
        "0.5 s from /proc/stat), so --workers N or a busy neighbour share the cores instead of stalling each "
        "other; false (the default): every step uses all cores. Off by default: with one worker it also yields "
        "cores to its own clients and costs up to 0.56x at C=32 on a 2-core machine (measured); turn it on for "
        "--workers N.",
    )
    warmup: bool = Field(True, description="Run one short batched generation before /ready turns 200.")

    # Engine
    engine: Literal["batched", "threadpool"] = Field(
        "batched", description="'batched' (continuous batching) or 'threadpool' (the original design, the baseline)."
    )
    core: Literal["auto", "textgen", "transformers"] = Field(
        "auto",
        description="Model core: textgen's own (Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma 3, GPT-2), transformers "
        "(any model), or auto (textgen's where one of its modules runs the model; the start-up log says which and "
        "why).",
    )
    weights: Literal["auto", "float", "bf16", "int8", "w8a8", "int4"] = Field(
        "auto", description="Weight format of the textgen core; auto measures this machine once (cached)."
    )
    fused_kernels: bool = Field(
        True,
        description="Model steps (Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma 3; bf16, CPU), the Q4_1 and w8a8 "
        "products and top-p sampling through fused C kernels (textgen/engine/core/fused.c), built with cc into "
        "~/.cache/textgen/kernels.",
    )
    speculative: Literal["auto", "ngram", "off"] = Field(
        "auto",
        description="Speculative decoding with drafts looked up in the prompt and text so far (n-gram), verified "
        "in one step: 'auto' drafts while few sequences run and backs off a sequence whose drafts keep failing; "
        "'ngram' drafts whenever a lookup finds something; 'off'. Greedy and seeded text is the same either way.",
    )
    speculative_tokens: int = Field(
        6, ge=1, le=32, description="Most tokens one sequence drafts per step (each is scored in the step)."
    )
    speculative_max_batch: int = Field(
        4,
        ge=1,
        le=1024,
        description="auto: sequences running at most for drafting (above it a step's extra tokens cost more than "
        "they save on a CPU).",
    )
    max_running: int = Field(64, ge=1, le=1024, description="Sequences decoded together in one batch.")
    max_waiting: int = Field(256, ge=0, description="Interactive requests allowed to wait for a batch slot.")
    max_prompt_tokens: int | None = Field(
        None,
        ge=1,
        description="Longer prompts get 400 naming the limit. Unset: the model's context minus "
        "TEXTGEN_MAX_NEW_TOKENS_LIMIT, at least 1024 (within the context); 1024 where the model states no context.",
    )
    kv_cache_memory: ByteSize | None = Field(
        None,
        description="Memory for the paged KV cache's block pool, e.g. 2GiB or 512MiB (reserved at start, "
        "touched as blocks are first used). Unset: TEXTGEN_KV_CACHE_MEMORY_FRACTION of the memory available at "
        "start. Never more than every sequence at full context can use; at least one full-context sequence.",
    )
    kv_cache_memory_fraction: float = Field(
        0.25, gt=0, le=0.9, description="Share of available memory the KV block pool may reserve when "
        "TEXTGEN_KV_CACHE_MEMORY is unset."
    )
    kv_block_size: int = Field(
        32, ge=1, le=1024, description="Positions per KV cache block (multiples of 16 keep the fused attention "
        "on its vector path)."
    )
    max_new_tokens_limit: int = Field(1024, ge=1, description="Upper bound on tokens generated per request.")
    max_logprobs_per_request: int = Field(
        8192,
        ge=1,
        description="Log-probabilities one request may ask for: choices × max tokens × (1 + alternatives); "
        "more get 400 naming the field (each costs the response 30-70 bytes).",
    )
    max_prefill_tokens: int = Field(4096, ge=1, description="Prompt tokens prefilled in one forward pass.")
    prefill_step_tokens: int = Field(
        256,
        ge=1,
        description="Prompt tokens prefilled per decode step; more wait for the next step, so a burst of "
        "new prompts stalls running ones briefly and the first of them answer sooner (a longer prompt runs alone).",
    )
    prefill_chunk_tokens: int = Field(
        256,
        ge=16,
        description="While streams decode, a longer prompt is prefilled at most this many tokens per step "
        "(chunked prefill; fewer where measured steps show that more would add over 40% to a decode step), so "
        "a long prompt slows the running streams' steps instead of stopping them.",
    )
    prefix_cache: bool = Field(
        True,
        description="Reuse the keys/values of prompt prefixes seen before (a chat's system prompt, an agent's "
        "tools) in the KV cache's blocks: a request prefills only what is not cached, and a finished request's "
        "blocks stay cached until the memory is needed (least recently used first). Outputs are the same "
        "either way.",
    )
    prefix_cache_shared: bool = Field(
        False,
        description="Share cached prefixes across tenants (API keys). Off by default: a cache hit answers "
        "faster, so a shared cache would let one tenant learn what another sent. Turn on for single-tenant "
        "deployments.",
    )
    embedding_max_inputs: int = Field(
        256, ge=1, le=2048, description="Inputs one /v1/embeddings request may embed; more get 400 naming input."
    )
    embedding_max_total_tokens: int = Field(
        16384,
        ge=1,
        description="Tokens one /v1/embeddings request may embed, all inputs together; more get 400 naming "
        "input (each input is also capped at TEXTGEN_MAX_PROMPT_TOKENS and the model's context).",
    )
    embedding_step_share: float = Field(
        0.05,
        gt=0,
        le=10,
        description="While streams decode, embedding inputs may add about this fraction to each decode step's "
        "time (measured as it runs: 0.05 slows streams' steps by about 5%; the requests' HTTP and JSON work costs "
        "streams about as much again on a 2-core CPU); the rest wait for later steps.",
    )
    request_timeout_s: float = Field(300.0, gt=0, description="Default deadline, counted from arrival.")
    threadpool_workers: int = Field(4, ge=1, description="Threads of the 'threadpool' baseline engine.")
    background_share: int = Field(
        4, ge=1, description="One background job is admitted for every N interactive requests under load."
    )
    shutdown_grace_s: float = Field(
        10.0, ge=0, description="How long running interactive requests may finish at shutdown; then 503."
    )

    # Jobs
    job_store: str = Field(
        "sqlite:///data/jobs.db",
        repr=False,
        description="sqlite:///relative.db, sqlite:////absolute.db, or redis://[:password@]host:port/db "
        "(rediss:// for TLS), shared by replicas on many machines; may hold a Redis password.",
    )
    job_store_file: Path | None = Field(None, description="A file holding TEXTGEN_JOB_STORE (container secrets).")
    redis_allow_volatile: bool = Field(
        False, description="Start on a Redis without appendonly (accepted jobs are lost if it restarts)."
    )
    job_ttl_s: float = Field(7 * 24 * 3600.0, gt=0, description="How long finished jobs are kept.")
    job_concurrency: int = Field(16, ge=1, description="Background jobs one process runs at a time.")
    job_poll_interval_s: float = Field(
        0.5, gt=0, description="How often a process looks for queued jobs and expired leases."
    )
    job_lease_s: float = Field(
        30.0, gt=0, description="A running job's lease: renewed while its process works; reclaimed once expired."
    )
    job_max_attempts: int = Field(3, ge=1, description="Starts before a job whose process keeps dying fails.")

    # Webhooks (callback_url on /generate_background)
    webhook_secret: str | None = Field(
        None, repr=False, description="HMAC-SHA256 key for X-TextGen-Signature; webhooks are refused while unset."
    )
    webhook_secret_file: Path | None = Field(None, description="A file holding TEXTGEN_WEBHOOK_SECRET.")
    webhook_timeout_s: float = Field(10.0, gt=0, description="Per delivery attempt.")
    webhook_retry_for_s: float = Field(600.0, gt=0, description="Retry a failing delivery for this long.")
    webhook_allow_private: bool = Field(
        False, description="Allow callback URLs on loopback/private/link-local addresses (tests, trusted networks)."
    )

    # Batches (the OpenAI Batch API: /v1/files and /v1/batches)
    files_dir: Path | None = Field(
        None,
        description="Uploaded and batch output files. Default: a folder beside the SQLite job store; with "
        "Redis, data/files (replicas on several machines must share one mount).",
    )
    batch_max_file_bytes: int = Field(
        100 * 1024 * 1024, ge=1024, description="Largest file POST /v1/files accepts (413 above)."
    )
    batch_max_lines: int = Field(50_000, ge=1, description="Most lines (requests) in one uploaded file.")
    batch_max_line_bytes: int = Field(1_048_576, ge=256, description="Longest line of a batch input file.")
    batch_poll_interval_s: float = Field(0.5, gt=0, description="How often running batches are advanced.")
    files_max_per_tenant: int = Field(
        1000, ge=0, description="Most files one tenant keeps (uploads and batch outputs); more get 413 (0 = no limit)."
    )
    files_max_bytes_per_tenant: int = Field(
        10 * 1024**3, ge=0, description="Most bytes of files one tenant keeps (uploads and outputs; 0 = no limit)."
    )
    files_expire_after_s: int = Field(
        2_592_000,
        ge=0,
        description="Uploads without expires_after expire this long after upload (OpenAI's 30 days; 0 = never).",
    )
    batch_output_expire_after_s: int = Field(
        2_592_000, ge=0, description="Batch output and error files expire this long after they are written (0 = never)."
    )
    files_sweep_interval_s: float = Field(60.0, gt=0, description="How often expired files are deleted.")
    batch_webhook_url: str | None = Field(
        None, description="POST every finished batch here (a batch's metadata.callback_url wins)."
    )

    # Content filter
    # The seed's words and their inflections; "stem*" blocks every word that starts with the stem.
    blocked_words: CommaList = Field(
        default_factory=lambda: list(DEFAULT_BLOCKED_WORDS),
        description="Comma-separated blocked words or phrases; 'stem*' blocks every word starting with the stem.",
    )
    blocked_words_file: Path | None = Field(
        None, description="A file of blocked words, one per line ('#' comments allowed), added to the list."
    )
    output_filter_action: Literal["reject", "redact"] = Field(
        "redact", description="Generated text that matches: 'redact' (replaced by [redacted]) or 'reject' (400)."
    )

    # Access and limits
    api_keys: CommaList = Field(
        default_factory=list, repr=False, description="Comma-separated API keys; empty = no auth."
    )
    api_keys_file: Path | None = Field(None, description="A file of API keys, one per line, added to the list.")
    admin_api_keys: CommaList = Field(
        default_factory=list, repr=False, description="Keys that see and cancel every owner's jobs (also valid keys)."
    )
    admin_api_keys_file: Path | None = Field(None, description="A file of admin keys, one per line.")
    auth_exempt_paths: CommaList = Field(
        default_factory=lambda: ["/health", "/ready", "/metrics"],
        description="Paths that never need a key (add /docs,/redoc,/openapi.json to browse the docs without one).",
    )
    metrics_require_key: bool = Field(
        True,
        description="With API keys on, /metrics needs a valid key too (give the scraper its own); false opens it "
        "to anyone who reaches the port.",
    )
    trusted_proxies: CommaList = Field(
        default_factory=list,
        description="Proxies (addresses/networks) whose X-Forwarded-For is believed; empty = trust none.",
    )
    auth_failures_per_minute: int = Field(
        10, ge=0, description="Missing/invalid keys per client address per minute before 429 (0 = unlimited)."
    )
    max_streams_per_caller: int = Field(
        8, ge=0, description="Open streams (SSE) per caller in one process; more get 429 (0 = unlimited)."
    )
    rate_limit_rpm: int = Field(
        0, ge=0, description="Requests per minute per API key, batch lines included (0 = unlimited)."
    )
    rate_limit_tpm: int = Field(
        0, ge=0, description="Prompt + generated tokens per minute per API key, batch lines included (0 = unlimited)."
    )
    max_body_bytes: int = Field(1_048_576, ge=1024, description="Larger request bodies get 413.")
    cors_origins: CommaList = Field(default_factory=list, description="Allowed CORS origins; empty = CORS off.")
    idempotency_ttl_s: float = Field(24 * 3600.0, gt=0, description="How long an Idempotency-Key is remembered.")

    # Logging
    log_format: Literal["text", "json"] = Field("text", description="'json': one JSON object per line.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="DEBUG also logs prompt text; INFO logs only its length and a short hash."
    )

    _split_lists = field_validator(
        "models",
        "model_aliases",
        "blocked_words",
        "api_keys",
        "admin_api_keys",
        "auth_exempt_paths",
        "cors_origins",
        "trusted_proxies",
        mode="before",
    )(_split_commas)

    @model_validator(mode="before")
    @classmethod
    def _read_secret_files(cls, data: Any) -> Any:
        """``TEXTGEN_X_FILE`` (a mounted container secret) sets ``TEXTGEN_X`` from the file's content."""
        if not isinstance(data, dict):
            return data
        for name in SECRET_FILE_SETTINGS:
            file = data.get(f"{name}_file")
            if file in (None, ""):
                continue
            if data.get(name) not in (None, ""):
                raise ValueError(f"set either {ENV_PREFIX}{name.upper()} or {ENV_PREFIX}{name.upper()}_FILE, not both")
            data = {**data, name: read_secret_file(Path(file), f"{ENV_PREFIX}{name.upper()}_FILE")}
        return data

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_log_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("model_aliases")
    @classmethod
    def _plain_model_names(cls, aliases: list[str]) -> list[str]:
        for alias in aliases:
            if len(alias) > MAX_MODEL_NAME_CHARS or any(char.isspace() or not char.isprintable() for char in alias):
                raise ValueError(f"each alias must be at most {MAX_MODEL_NAME_CHARS} printable characters, no spaces")
        return aliases

    @field_validator("models")
    @classmethod
    def _named_sources(cls, pairs: list[str]) -> list[str]:
        names: set[str] = set()
        for pair in pairs:
            name, equals, source = (part.strip() for part in pair.partition("="))
            if not equals or not name or not source:
                raise ValueError("each entry is name=source (e.g. smol=bundled,gemma=/models/gemma.gguf)")
            if len(name) > MAX_MODEL_NAME_CHARS or any(char.isspace() or not char.isprintable() for char in name):
                raise ValueError(f"each name must be at most {MAX_MODEL_NAME_CHARS} printable characters, no spaces")
            if name in names:
                raise ValueError(f"the name {name!r} is given twice; each model needs its own name")
            names.add(name)
        return [f"{name.strip()}={source.strip()}" for name, _, source in (pair.partition("=") for pair in pairs)]

    @property
    def model_sources(self) -> list[tuple[str, str]]:
        """TEXTGEN_MODELS as (name, source) pairs, the default first; empty when TEXTGEN_MODEL serves alone."""
        return [(name, source) for name, _, source in (pair.partition("=") for pair in self.models)]

    @model_validator(mode="after")
    def _one_way_to_name_models(self) -> Settings:
        if self.models and {"model", "model_name"} & self.model_fields_set:
            raise ValueError(
                "set either TEXTGEN_MODELS (several models, each named there) or TEXTGEN_MODEL/TEXTGEN_MODEL_NAME "
                "(one model), not both"
            )
        return self

    @model_validator(mode="after")
    def _check_limits(self) -> Settings:
        if self.max_prompt_tokens is not None and self.max_prefill_tokens < self.max_prompt_tokens:
            raise ValueError(
                "TEXTGEN_MAX_PREFILL_TOKENS must be >= TEXTGEN_MAX_PROMPT_TOKENS, "
                "or the longest allowed prompt could never be prefilled"
            )
        return self


def describe_validation_error(error: ValidationError) -> str:
    """One line per bad field, naming the env var a user has to change."""
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "settings"
        env_name = f"{ENV_PREFIX}{field.upper()}" if item["loc"] else "settings"
        got = item.get("input")
        secret = bool(item["loc"]) and str(item["loc"][0]) in SECRET_SETTINGS
        shown = f" (got {got!r})" if got is not None and not isinstance(got, dict) and not secret else ""
        lines.append(f"{env_name}: {item['msg']}{shown}")
    return "Invalid settings, fix these environment variables: " + "; ".join(lines)


def load_settings(**overrides: Any) -> Settings:
    """Read settings from the environment (plus explicit overrides), failing with a fix hint."""
    try:
        return Settings(**overrides)
    except ValidationError as error:
        raise ConfigError(describe_validation_error(error)) from None
