"""Closed-loop load benchmark of the text-generation service, one uvicorn server per engine.

    python -m bench.bench                                  # both engines, C = 1, 8, 32, 64
    python -m bench.bench --engines batched --concurrency 1,4 --requests-per-level 4 --max-new-tokens 8
    python -m bench.bench --engines batched --mode stream  # only the streaming endpoint
    python -m bench.bench --url http://127.0.0.1:8000 --label prod-like   # an already running server
    python -m bench.bench --engines batched --weights auto,int4,bf16       # one batched server per weight format
    python -m bench.bench --engines batched --compare-url http://127.0.0.1:8080 --compare-label llama.cpp
    python -m bench.bench --engines batched --model /path/model.gguf --mode openai \
        --compare-llama-cpp /path/to/venv-with-llama-cpp-python/bin/python      # starts llama.cpp's server too

For each engine a real ``uvicorn main:app`` subprocess is started (``TEXTGEN_ENGINE`` set, a throw-away
SQLite job store, ``TEXTGEN_MAX_WAITING=1024``; other ``TEXTGEN_*`` variables pass through), waited for on
``GET /ready``, warmed up with two requests per mode and then driven at each concurrency C, in each mode,
by C workers that send requests back to back until the level's request count is reached. Modes
(``--mode``): ``generate`` (``POST /generate``), ``stream`` (``/generate`` with ``stream: true``; adds
client-side time to first token and inter-token latency), ``openai`` (``POST /v1/completions``) and
``json`` (``/generate`` with a small ``json_schema``: structured output; after the levels, the per-step
cost of the token masks is measured in-process with ``bench.mask_cost`` and reported beside it). The
threadpool engine is the baseline and runs only ``generate`` unless ``--all-modes-for-baseline``.
``--weights`` starts one batched server per ``TEXTGEN_WEIGHTS`` value (rows ``batched`` for auto,
``batched-int4``...); before each, ``bench.core_rate`` measures that core's decode rate alone, printed next
to the server's figure. ``--compare-url`` drives any OpenAI-compatible server (llama.cpp's ``llama-server``,
vLLM, another textgen) with the identical ``/v1/completions`` workload in the same run, and prints the
ratios; ``--compare-llama-cpp PYTHON`` starts llama-cpp-python's server (``PYTHON -m llama_cpp.server``, not
in requirements.txt) on the same GGUF file with ``--compare-threads`` threads for that comparison and stops it
afterwards. ``--model`` sets ``TEXTGEN_MODEL`` for everything the run starts; ``--workers N`` starts each server
as ``uvicorn --workers N``. Each level records the load generator's own CPU use and the machine's load average.
Progress goes to stderr, the table to stdout, and results.json / results.md / results.png to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import json
import logging
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as ``python bench/bench.py``: make ``bench`` importable
    sys.path.insert(0, str(REPO_ROOT))

from bench.mask_cost import BENCH_SCHEMA  # noqa: E402
from bench.report import render_table, write_reports  # noqa: E402
from bench.rss import PeakRssSampler  # noqa: E402
from bench.sse import SseEvent, SseParser  # noqa: E402
from bench.stats import LevelStats, Mode, Outcome, RequestResult, aggregate, inter_token_latency  # noqa: E402

LOG = logging.getLogger("bench")

ENGINES = ("batched", "threadpool")
WEIGHTS = ("auto", "float", "bf16", "int8", "int4")
BASELINE_ENGINE = "threadpool"  # runs only generate unless --all-modes-for-baseline
MODES = tuple(mode.value for mode in Mode)
DEFAULT_CONCURRENCY = (1, 8, 32, 64)
DEFAULT_OUT = REPO_ROOT / "bench" / "results"
WARMUP_REQUESTS = 2
PROGRESS_INTERVAL_S = 2.0
READY_POLL_S = 0.5
STOP_GRACE_S = 30.0
LOG_TAIL_LINES = 40
TEMPERATURE = 0.8
TOP_P = 0.95
OPENAI_MODEL = "default"  # an alias of the served model (TEXTGEN_MODEL_ALIASES); another name is a 404
PATHS = {
    Mode.GENERATE: "/generate",
    Mode.STREAM: "/generate",
    Mode.OPENAI: "/v1/completions",
    Mode.JSON: "/generate",
    Mode.CHAT: "/v1/chat/completions",
    Mode.TOOLS: "/v1/chat/completions",
}
# The tools mode's functions: what an agent framework sends (two functions, Pydantic-style schemas).
BENCH_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 40},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city", "unit"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "search_web",
            "description": "Search the web.",
            "parameters": {
                "type": "object",
                "properties": {
                    "query": {"type": "string", "maxLength": 80},
                    "max_results": {"type": "integer", "minimum": 1, "maximum": 20},
                },
                "required": ["query"],
            },
        },
    },
]
# Short prompts (~15 tokens each); requests cycle through them so consecutive prompts differ.
PROMPTS = (
    "Write a short story about a robot who learns to paint.",
    "Describe a quiet morning in a small fishing village on the northern coast.",
    "Explain to a curious child why the sky turns orange and red at sunset.",
    "Write a letter from a lighthouse keeper to an old friend who lives far away.",
    "Tell the story of a lost cat finding its way home through a busy city.",
    "Describe the first day of a young baker who has just opened her own shop.",
    "Write a poem about the sound of rain on a tin roof late at night.",
    "Imagine a library where every book can talk, and describe one conversation.",
)


class BenchError(RuntimeError):
    """A server that would not start, crashed, or answered the warm-up wrongly."""


@dataclass(frozen=True, slots=True)
class LoadConfig:
    max_new_tokens: int
    request_timeout_s: float
    # Fields added to every request body: llama-cpp-python's server has no ignore_eos, but min_tokens
    # keeps it generating to max_tokens too.
    extra_fields: tuple[tuple[str, Any], ...] = ()


@dataclass(slots=True)
class Server:
    """A uvicorn subprocess started by the benchmark."""

    engine: str
    process: subprocess.Popen[bytes]
    base_url: str
    log_path: Path
    log_file: IO[bytes]


@dataclass(slots=True)
class EngineRun:
    records: list[LevelStats] = field(default_factory=list)
    models: set[str] = field(default_factory=set)
    servers: dict[str, dict[str, str]] = field(default_factory=dict)  # label -> core, weights (from /metrics)
    core_rates: dict[str, Any] = field(default_factory=dict)  # label -> bench.core_rate result
    mask_cost: list[dict[str, float]] = field(default_factory=list)


# --- command line -------------------------------------------------------------------------------------


def parse_int_list(text: str) -> list[int]:
    try:
        values = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parse_engines(text: str) -> list[str]:
    engines = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [e for e in engines if e not in ENGINES]
    if not engines or unknown:
        raise argparse.ArgumentTypeError(f"engines must be a comma-separated subset of {','.join(ENGINES)}")
    return list(dict.fromkeys(engines))


def parse_weights(text: str) -> list[str]:
    weights = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [w for w in weights if w not in WEIGHTS]
    if not weights or unknown:
        raise argparse.ArgumentTypeError(f"weights must be a comma-separated subset of {','.join(WEIGHTS)}")
    return list(dict.fromkeys(weights))


def parse_modes(text: str) -> list[str]:
    modes = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [m for m in modes if m not in MODES]
    if not modes or unknown:
        raise argparse.ArgumentTypeError(f"modes must be a comma-separated subset of {','.join(MODES)}")
    return list(dict.fromkeys(modes))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench",
        description="Closed-loop load benchmark of the textgen service (one uvicorn server per engine).",
    )
    parser.add_argument("--engines", type=parse_engines, default=list(ENGINES), help="default: batched,threadpool")
    parser.add_argument(
        "--mode",
        "--modes",
        dest="modes",
        type=parse_modes,
        default=list(MODES),
        help="endpoints to drive: generate (/generate), stream (/generate with stream: true), openai "
        "(/v1/completions), json (/generate with a json_schema), chat (/v1/chat/completions), tools (chat with "
        'tool_choice "required"); default: all',
    )
    parser.add_argument(
        "--all-modes-for-baseline",
        action="store_true",
        help=f"run every --mode on the {BASELINE_ENGINE} engine too (by default it runs only generate)",
    )
    parser.add_argument(
        "--concurrency", type=parse_int_list, default=list(DEFAULT_CONCURRENCY), help="default: 1,8,32,64"
    )
    parser.add_argument(
        "--requests-per-level", type=int, default=None, metavar="N", help="default: max(2*C, 8) per level"
    )
    parser.add_argument(
        "--requests-per-client", type=int, default=2, metavar="K", help="without --requests-per-level: K*C per level"
    )
    parser.add_argument(
        "--min-requests", type=int, default=8, metavar="M", help="without --requests-per-level: at least M per level"
    )
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per request (default 64)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (default)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder (default bench/results)")
    parser.add_argument("--url", default=None, help="benchmark an already running server instead of starting one")
    parser.add_argument("--label", default=None, help="engine label for --url results (default 'server')")
    parser.add_argument(
        "--weights", type=parse_weights, default=["auto"], help="TEXTGEN_WEIGHTS values for batched (default auto)"
    )
    parser.add_argument("--no-core-rate", action="store_true", help="skip measuring each core alone first")
    parser.add_argument("--compare-url", default=None, help="also drive this OpenAI-compatible server (openai mode)")
    parser.add_argument(
        "--compare-label", default=None, help="row label for --compare-url (default 'compare', or 'llama.cpp')"
    )
    parser.add_argument(
        "--compare-llama-cpp",
        default=None,
        metavar="PYTHON",
        help="start llama-cpp-python's OpenAI server (PYTHON -m llama_cpp.server) on the --model GGUF file and "
        "compare with it in this run (openai mode)",
    )
    parser.add_argument(
        "--compare-threads", type=int, default=2, help="--n_threads of the --compare-llama-cpp server (default 2)"
    )
    parser.add_argument(
        "--model",
        default=None,
        help="TEXTGEN_MODEL for every server and measurement this run starts ('bundled', a GGUF file, a folder)",
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="uvicorn --workers of each server this run starts (default 1)"
    )
    parser.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for /ready")
    parser.add_argument("--request-timeout", type=float, default=900.0, help="seconds per request")
    parser.add_argument(
        "--batch",
        action="store_true",
        help="instead of the load levels: --batch-requests requests as one /v1/batches batch vs the same as "
        "concurrent /v1/completions (see bench/batch_api.py); prints the tokens/s ratio",
    )
    parser.add_argument("--batch-requests", type=int, default=1000, metavar="N", help="with --batch (default 1000)")
    parser.add_argument(
        "--batch-concurrency", type=int, default=64, metavar="C", help="with --batch: concurrent clients (default 64)"
    )
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.label is not None and args.url is None:
        parser.error("--label only applies with --url")
    if args.requests_per_level is not None and args.requests_per_level < 1:
        parser.error("--requests-per-level must be >= 1")
    if args.requests_per_client < 1 or args.min_requests < 1:
        parser.error("--requests-per-client and --min-requests must be >= 1")
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be >= 1")
    if args.url is not None:
        args.url = args.url.rstrip("/")
        args.label = args.label or "server"
    if args.compare_url is not None:
        args.compare_url = args.compare_url.rstrip("/")
    if args.compare_url is not None and args.compare_llama_cpp is not None:
        parser.error("give --compare-url or --compare-llama-cpp, not both")
    if args.compare_threads < 1 or args.workers < 1:
        parser.error("--compare-threads and --workers must be >= 1")
    if args.compare_label is None:
        args.compare_label = "llama.cpp" if args.compare_llama_cpp else "compare"
    return args


def engine_label(engine: str, weights: str) -> str:
    """Row label: ``batched`` for the default weights, ``batched-int4`` for a forced format."""
    return engine if engine != "batched" or weights == "auto" else f"{engine}-{weights}"


def requests_for_level(concurrency: int, override: int | None, per_client: int = 2, minimum: int = 8) -> int:
    return override if override is not None else max(per_client * concurrency, minimum)


def modes_for_engine(engine: str, modes: Sequence[str], all_modes_for_baseline: bool = False) -> list[str]:
    """The modes ``engine`` runs: all of ``modes``, except that the baseline engine keeps only generate."""
    if engine != BASELINE_ENGINE or all_modes_for_baseline:
        return list(modes)
    return [mode for mode in modes if mode == Mode.GENERATE]


# --- server lifecycle ---------------------------------------------------------------------------------


def pick_free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def server_env(
    engine: str, job_db: Path, base: Mapping[str, str] | None = None, weights: str | None = None
) -> dict[str, str]:
    """The caller's environment plus the benchmark's engine, a private job store and a deep queue."""
    env = dict(os.environ if base is None else base)
    if weights is not None:
        env["TEXTGEN_WEIGHTS"] = weights
    env.update(
        {
            "TEXTGEN_ENGINE": engine,
            "TEXTGEN_JOB_STORE": f"sqlite:///{job_db.resolve()}",  # sqlite:/// + /abs/path = 4 slashes
            "TEXTGEN_MAX_WAITING": "1024",
            "TEXTGEN_MAX_STREAMS_PER_CALLER": "0",  # one client address opens every stream here
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def start_server(
    engine: str,
    host: str,
    port: int,
    out_dir: Path,
    job_db: Path,
    weights: str | None = None,
    workers: int = 1,
    label: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Server:
    label = label or engine_label(engine, weights or "auto")
    port = port or pick_free_port(host)
    log_path = out_dir / f"server-{label}.log"
    log_file = log_path.open("wb")
    command = [sys.executable, "-m", "uvicorn", "main:app", "--host", host, "--port", str(port)]
    if workers > 1:
        command += ["--workers", str(workers)]
    LOG.info("[%s] starting %s (log: %s)", label, " ".join(command[1:]), log_path)
    process = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        env=server_env(engine, job_db, base=env, weights=weights),
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: Ctrl-C reaches us, and we stop it in order
    )
    url_host = f"[{host}]" if ":" in host else host
    return Server(label, process, f"http://{url_host}:{port}", log_path, log_file)


@contextlib.contextmanager
def served(
    args: argparse.Namespace, job_db: Path, env: Mapping[str, str] | None = None, port: int = 0
) -> Iterator[str]:
    """The base URL of a ready server for the block: ``args.url``'s when given (an already running server),
    else a batched ``uvicorn main:app`` started as ``start_server`` starts one (``env`` for its environment)
    and stopped when the block ends. ``args``: the options of ``add_server_arguments``."""
    if args.url is not None:
        base_url = args.url.rstrip("/")
        wait_until_ready(base_url, args.startup_timeout)
        yield base_url
        return
    server = start_server("batched", args.host, port, args.out, job_db, env=env)
    try:
        wait_until_ready(server.base_url, args.startup_timeout, server)
        yield server.base_url
    finally:
        stop_server(server)


def add_server_arguments(parser: argparse.ArgumentParser, request_timeout: float = 900.0) -> None:
    """--host, --startup-timeout, --request-timeout and --out: the options of a bench that starts its servers."""
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for /ready")
    parser.add_argument("--request-timeout", type=float, default=request_timeout, help="seconds per request")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder (default bench/results)")


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as error:
        return f"(could not read {path}: {error})"
    return "\n".join(text.splitlines()[-lines:])


def server_failure(server: Server, what: str) -> BenchError:
    return BenchError(f"[{server.engine}] {what}; last lines of {server.log_path}:\n{log_tail(server.log_path)}")


def ensure_alive(server: Server | None) -> None:
    if server is not None and server.process.poll() is not None:
        raise server_failure(server, f"server exited with code {server.process.returncode}")


def wait_until_ready(base_url: str, timeout_s: float, server: Server | None = None) -> None:
    """Poll ``GET /ready`` until 200; fail early if the server process exits."""
    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    with httpx.Client(base_url=base_url, timeout=5.0, trust_env=False) as client:
        while time.monotonic() < deadline:
            ensure_alive(server)
            try:
                response = client.get("/ready")
                if response.status_code == 200:
                    return
                last = f"HTTP {response.status_code}"
            except httpx.HTTPError as error:
                last = f"{type(error).__name__}: {error}"
            time.sleep(READY_POLL_S)
    what = f"{base_url}/ready not 200 after {timeout_s:.0f}s (last: {last})"
    if server is not None:
        raise server_failure(server, what)
    raise BenchError(what)


def stop_server(server: Server) -> None:
    """SIGTERM, then SIGKILL to the whole process group after ``STOP_GRACE_S``."""
    process = server.process
    if process.poll() is None:
        LOG.info("[%s] stopping server (pid %d)", server.engine, process.pid)
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            LOG.warning("[%s] server ignored SIGTERM for %.0fs, killing it", server.engine, STOP_GRACE_S)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    server.log_file.close()


# --- requests -----------------------------------------------------------------------------------------


def build_payload(index: int, max_new_tokens: int) -> dict[str, Any]:
    """The index-th /generate request: no seed, since a seeded request serializes the threadpool engine."""
    return {
        "prompt": PROMPTS[index % len(PROMPTS)],
        "max_new_tokens": max_new_tokens,
        "ignore_eos": True,
        "temperature": TEMPERATURE,
        "top_p": TOP_P,
    }


def build_request(mode: str, index: int, max_new_tokens: int) -> tuple[str, dict[str, Any]]:
    """Path and JSON body of the index-th request of ``mode``.

    /v1/completions takes the ``ignore_eos`` extension (as vLLM does), so every mode generates exactly
    ``max_new_tokens`` and their throughputs compare like for like.
    """
    if mode == Mode.OPENAI:
        payload = {
            "model": OPENAI_MODEL,
            "prompt": PROMPTS[index % len(PROMPTS)],
            "max_tokens": max_new_tokens,
            "temperature": TEMPERATURE,
            "top_p": TOP_P,
            "stream": False,
            "ignore_eos": True,
        }
        return PATHS[Mode.OPENAI], payload
    if mode in (Mode.CHAT, Mode.TOOLS):
        return PATHS[Mode(mode)], build_chat_payload(mode, index, max_new_tokens)
    payload = build_payload(index, max_new_tokens)
    if mode == Mode.STREAM:
        payload["stream"] = True
    if mode == Mode.JSON:
        payload["json_schema"] = BENCH_SCHEMA  # the grammar ends the row ("stop") when the record is complete
    return PATHS[Mode(mode)], payload


def build_chat_payload(mode: str, index: int, max_new_tokens: int) -> dict[str, Any]:
    """A chat request; in tools mode the same request with ``tool_choice: "required"``. Both take
    ``ignore_eos`` so they generate max_new_tokens alike (a tools answer also ends when its grammar does:
    after the most parallel calls an answer may hold)."""
    payload: dict[str, Any] = {
        "model": OPENAI_MODEL,
        "messages": [{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}],
        "max_tokens": max_new_tokens,
        "temperature": TEMPERATURE,
        "top_p": TOP_P,
        "ignore_eos": True,
    }
    if mode == Mode.TOOLS:
        payload.update(tools=BENCH_TOOLS, tool_choice="required")
    return payload


def _unsuccessful(status_code: int, body: Any, latency_s: float) -> RequestResult | None:
    """503 is a rejection, any other non-200 status a failure; None for 200."""
    if status_code == 503:
        return RequestResult(Outcome.REJECTED, latency_s, error="HTTP 503")
    if status_code != 200:
        return RequestResult(Outcome.FAILED, latency_s, error=f"HTTP {status_code}: {str(body)[:200]}")
    return None


def result_from_response(status_code: int, body: Any, latency_s: float) -> RequestResult:
    """Classify one /generate answer: 200 with a valid body completes, 503 is a rejection, the rest failed."""
    if (unsuccessful := _unsuccessful(status_code, body, latency_s)) is not None:
        return unsuccessful
    try:
        ttft = body["timings"]["time_to_first_token_s"]
        return RequestResult(
            Outcome.COMPLETED,
            latency_s,
            prompt_tokens=int(body["prompt_tokens"]),
            completion_tokens=int(body["completion_tokens"]),
            ttft_s=None if ttft is None else float(ttft),
            model=str(body["model"]),
        )
    except (KeyError, TypeError, ValueError) as error:
        return RequestResult(Outcome.FAILED, latency_s, error=f"malformed 200 body ({error!r}): {str(body)[:200]}")


def result_from_openai(status_code: int, body: Any, latency_s: float) -> RequestResult:
    """Classify one /v1/completions answer; tokens come from its ``usage`` (no server-side TTFT there)."""
    if (unsuccessful := _unsuccessful(status_code, body, latency_s)) is not None:
        return unsuccessful
    try:
        usage = body["usage"]
        str(body["choices"][0]["text"])
        return RequestResult(
            Outcome.COMPLETED,
            latency_s,
            prompt_tokens=int(usage["prompt_tokens"]),
            completion_tokens=int(usage["completion_tokens"]),
            model=str(body["model"]),
        )
    except (KeyError, IndexError, TypeError, ValueError) as error:
        return RequestResult(Outcome.FAILED, latency_s, error=f"malformed 200 body ({error!r}): {str(body)[:200]}")


def result_from_chat(status_code: int, body: Any, latency_s: float) -> RequestResult:
    """Classify one /v1/chat/completions answer (text or tool calls); tokens from its ``usage``."""
    if (unsuccessful := _unsuccessful(status_code, body, latency_s)) is not None:
        return unsuccessful
    try:
        usage = body["usage"]
        message = body["choices"][0]["message"]
        if message.get("content") is None and not message.get("tool_calls"):
            raise ValueError("neither content nor tool_calls")
        return RequestResult(
            Outcome.COMPLETED,
            latency_s,
            prompt_tokens=int(usage["prompt_tokens"]),
            completion_tokens=int(usage["completion_tokens"]),
            model=str(body["model"]),
        )
    except (KeyError, IndexError, TypeError, ValueError) as error:
        return RequestResult(Outcome.FAILED, latency_s, error=f"malformed 200 body ({error!r}): {str(body)[:200]}")


def result_from_stream(events: Sequence[tuple[float, SseEvent]], latency_s: float) -> RequestResult:
    """Classify a 200 event stream of /generate; each event comes with its arrival time in seconds since
    the request was sent.

    ``token`` events with non-empty text give the client-side TTFT (the first one) and, with the done
    event's ``completion_tokens``, the inter-token latency; ``done`` completes the request (events after
    it are ignored); ``error``, a malformed event or a stream that ends without ``done`` fails it.
    """
    first_token_s: float | None = None
    last_token_s = 0.0
    for at_s, event in events:
        if event.event == "token":
            try:
                text = json.loads(event.data)["text"]
            except (KeyError, TypeError, ValueError) as error:
                return RequestResult(Outcome.FAILED, latency_s, error=f"malformed token event ({error!r})")
            if text:
                first_token_s = at_s if first_token_s is None else first_token_s
                last_token_s = at_s
        elif event.event == "error":
            return RequestResult(Outcome.FAILED, latency_s, error=f"error event: {event.data[:200]}")
        elif event.event == "done":
            try:
                body: Any = json.loads(event.data)
            except ValueError:
                body = event.data
            result = result_from_response(200, body, latency_s)
            if result.outcome is not Outcome.COMPLETED or first_token_s is None:
                return result
            itl_s = inter_token_latency(first_token_s, last_token_s, result.completion_tokens)
            return dataclasses.replace(result, client_ttft_s=first_token_s, itl_s=itl_s)
    return RequestResult(Outcome.FAILED, latency_s, error=f"stream ended without a done event ({len(events)} events)")


def _body(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text


def _transport_failure(error: httpx.HTTPError, start: float) -> RequestResult:
    return RequestResult(Outcome.FAILED, time.perf_counter() - start, error=f"{type(error).__name__}: {error}")


async def send_stream(client: httpx.AsyncClient, path: str, payload: Mapping[str, Any]) -> RequestResult:
    """One streamed request, read line by line; e2el latency runs to the end of the stream."""
    start = time.perf_counter()
    events: list[tuple[float, SseEvent]] = []
    try:
        async with client.stream("POST", path, json=payload) as response:
            if response.status_code != 200:
                await response.aread()
                return result_from_response(response.status_code, _body(response), time.perf_counter() - start)
            parser = SseParser()
            async for line in response.aiter_lines():
                if (event := parser.feed(line)) is not None:
                    events.append((time.perf_counter() - start, event))
            if (event := parser.flush()) is not None:
                events.append((time.perf_counter() - start, event))
    except httpx.HTTPError as error:
        return _transport_failure(error, start)
    return result_from_stream(events, time.perf_counter() - start)


async def send_request(
    client: httpx.AsyncClient, mode: str, index: int, max_new_tokens: int, extra: tuple[tuple[str, Any], ...] = ()
) -> RequestResult:
    """The index-th request of ``mode`` (with the ``extra`` fields), classified."""
    path, payload = build_request(mode, index, max_new_tokens)
    payload.update(extra)
    if mode == Mode.STREAM:
        return await send_stream(client, path, payload)
    start = time.perf_counter()
    try:
        response = await client.post(path, json=payload)
    except httpx.HTTPError as error:
        return _transport_failure(error, start)
    latency_s = time.perf_counter() - start
    classify = {Mode.OPENAI: result_from_openai, Mode.CHAT: result_from_chat, Mode.TOOLS: result_from_chat}.get(
        Mode(mode), result_from_response
    )
    return classify(response.status_code, _body(response), latency_s)


def make_client(base_url: str, concurrency: int, request_timeout_s: float) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(request_timeout_s, connect=30.0)
    return httpx.AsyncClient(base_url=base_url, limits=limits, timeout=timeout, trust_env=False)


async def warm_up(base_url: str, config: LoadConfig, label: str, modes: Sequence[str]) -> set[str]:
    """Send ``WARMUP_REQUESTS`` sequential requests in each mode; any that does not complete is fatal."""
    models = set()
    async with make_client(base_url, 1, config.request_timeout_s) as client:
        for mode in modes:
            prefix = f"[{label}/{mode}]"
            for index in range(WARMUP_REQUESTS):
                result = await send_request(client, mode, index, config.max_new_tokens, config.extra_fields)
                if result.outcome is not Outcome.COMPLETED:
                    raise BenchError(f"{prefix} warm-up request {index + 1} {result.outcome}: {result.error}")
                LOG.info("%s warm-up %d/%d: %.2fs", prefix, index + 1, WARMUP_REQUESTS, result.latency_s)
                if result.model:
                    models.add(result.model)
    return models


# --- one level ----------------------------------------------------------------------------------------


async def report_progress(prefix: str, results: list[RequestResult], total: int) -> None:
    """Log ``prefix N/total done`` at most every ``PROGRESS_INTERVAL_S`` while the level runs."""
    shown = -1
    while True:
        await asyncio.sleep(PROGRESS_INTERVAL_S)
        if len(results) != shown:
            shown = len(results)
            LOG.info("%s %d/%d done", prefix, shown, total)


async def closed_loop(
    base_url: str, mode: str, concurrency: int, total: int, config: LoadConfig, results: list[RequestResult]
) -> float:
    """C workers pull request indexes from one shared counter until ``total`` requests were sent.

    Results are appended to ``results`` as they arrive; returns the level's wall time in seconds.
    """
    counter = itertools.count()

    async def worker(client: httpx.AsyncClient) -> None:
        while (index := next(counter)) < total:
            results.append(await send_request(client, mode, index, config.max_new_tokens, config.extra_fields))

    async with make_client(base_url, concurrency, config.request_timeout_s) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        return time.perf_counter() - start


def log_level_summary(
    prefix: str, stats: LevelStats, results: Sequence[RequestResult], config: LoadConfig, mode: str
) -> None:
    p95 = "-" if stats.p95_e2el_ms is None else f"{stats.p95_e2el_ms:.0f}"
    LOG.info(
        "%s %d/%d done in %.1fs: %.1f out tok/s, p95 %s ms",
        prefix,
        len(results),
        len(results),
        stats.duration_s,
        stats.output_throughput,
        p95,
    )
    errors = [r.error for r in results if r.outcome is not Outcome.COMPLETED and r.error]
    if errors:
        LOG.warning("%s %d requests failed or were rejected; first: %s", prefix, len(errors), errors[0])
    budget = config.max_new_tokens
    short = sum(1 for r in results if r.outcome is Outcome.COMPLETED and r.completion_tokens < budget)
    if short:
        LOG.warning("%s %d completed requests generated fewer than %d tokens", prefix, short, budget)


async def run_level(
    base_url: str, engine: str, mode: str, concurrency: int, total: int, config: LoadConfig, pid: int | None
) -> LevelStats:
    prefix = f"[{engine}/{mode} C={concurrency}]"
    LOG.info("%s %d requests of %d new tokens", prefix, total, config.max_new_tokens)
    results: list[RequestResult] = []
    load_avg = os.getloadavg()[0]
    cpu_started = time.process_time()
    progress = asyncio.create_task(report_progress(prefix, results, total))
    try:
        with PeakRssSampler(pid) as sampler:
            duration_s = await closed_loop(base_url, mode, concurrency, total, config, results)
    finally:
        progress.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await progress
    client_cpu = 100.0 * (time.process_time() - cpu_started) / duration_s if duration_s > 0 else None
    stats = aggregate(
        engine,
        concurrency,
        results,
        duration_s,
        sampler.peak_mib,
        mode=mode,
        client_cpu_pct=client_cpu,
        load_avg_1m=load_avg,
    )
    log_level_summary(prefix, stats, results, config, mode)
    return stats


# --- one engine ---------------------------------------------------------------------------------------


async def run_levels(
    base_url: str,
    label: str,
    modes: Sequence[str],
    args: argparse.Namespace,
    config: LoadConfig,
    server: Server | None,
    run: EngineRun,
) -> None:
    """Warm up every mode, then run every concurrency level in order and, within a level, every mode
    (so the modes compared at one C run close together), appending each record to ``run``."""
    run.models |= await warm_up(base_url, config, label, modes)
    pid = None if server is None else server.process.pid
    for concurrency in args.concurrency:
        total = requests_for_level(concurrency, args.requests_per_level, args.requests_per_client, args.min_requests)
        for mode in modes:
            ensure_alive(server)
            run.records.append(await run_level(base_url, label, mode, concurrency, total, config, pid))
    ensure_alive(server)


def bench_engine(
    engine: str, args: argparse.Namespace, config: LoadConfig, out_dir: Path, run: EngineRun, weights: str = "auto"
) -> None:
    """Start a server for ``engine``, benchmark it in its modes, and always stop it."""
    label = engine_label(engine, weights)
    modes = modes_for_engine(engine, args.modes, args.all_modes_for_baseline)
    if not modes:
        LOG.warning("[%s] skipped: it runs only generate without --all-modes-for-baseline", label)
        return
    if engine == "batched" and not args.no_core_rate:
        run.core_rates[label] = measure_core_rate(weights, args.concurrency, out_dir)
    with tempfile.TemporaryDirectory(prefix="textgen-bench-") as tmp:
        server = start_server(
            engine, args.host, args.port, out_dir, Path(tmp) / "jobs.db", weights=weights, workers=args.workers
        )
        try:
            started = time.monotonic()
            wait_until_ready(server.base_url, args.startup_timeout, server)
            LOG.info("[%s] ready after %.1fs at %s", label, time.monotonic() - started, server.base_url)
            run.servers[label] = server_core_info(server.base_url)
            asyncio.run(run_levels(server.base_url, label, modes, args, config, server, run))
        finally:
            stop_server(server)


def measure_core_rate(weights: str, batches: Sequence[int], out_dir: Path) -> dict[str, Any]:
    """``python -m bench.core_rate`` in its own process (so this one holds no model), as JSON."""
    target = out_dir / f"core-rate-{weights}.json"
    command = [sys.executable, "-m", "bench.core_rate", "--batches", ",".join(map(str, batches)), "--json", str(target)]
    env = {**os.environ, "TEXTGEN_WEIGHTS": weights}
    LOG.info("[core %s] measuring the core alone: %s", weights, " ".join(command[1:]))
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not target.is_file():
        LOG.warning("[core %s] core rate not measured: %s", weights, done.stderr.strip().splitlines()[-1:])
        return {}
    return dict(json.loads(target.read_text(encoding="utf-8")))


def server_core_info(base_url: str) -> dict[str, str]:
    """The core and weight formats a textgen server reports in its ``textgen_model_info`` metric, and whether
    its fused kernels are on (from ``/ready``: a fallback to PyTorch's operators names its reason)."""
    info: dict[str, str] = {}
    try:
        text = httpx.get(f"{base_url}/metrics", timeout=10.0, trust_env=False).text
        details = httpx.get(f"{base_url}/ready", timeout=10.0, trust_env=False).json().get("details") or {}
    except (httpx.HTTPError, ValueError):
        return info
    for line in text.splitlines():
        if line.startswith("textgen_model_info{"):
            labels = line[line.index("{") + 1 : line.rindex("}")]
            pairs = (item.split("=", 1) for item in labels.split('",') if "=" in item)
            found = {k.strip(): v.strip().strip('"') for k, v in pairs}
            info = {k: found[k] for k in ("core", "weights", "dtype", "device") if found.get(k)}
            break
    if details.get("fused_kernels"):
        info["fused kernels"] = str(details["fused_kernels"])
        if info["fused kernels"] != "on":
            LOG.warning("%s: fused kernels %s", base_url, info["fused kernels"])
    return info


def bench_compare(args: argparse.Namespace, config: LoadConfig, run: EngineRun) -> None:
    """The identical /v1/completions workload against another OpenAI-compatible server."""
    wait_until_ready_openai(args.compare_url, args.startup_timeout)
    asyncio.run(run_levels(args.compare_url, args.compare_label, [Mode.OPENAI.value], args, config, None, run))


def gguf_file_of(model: str | None) -> Path:
    """The GGUF file behind ``--model`` (the bundled model's own file for 'bundled' or none)."""
    if model in (None, "bundled"):
        from textgen.loader import find_bundled_gguf

        return find_bundled_gguf()
    path = Path(model).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path.resolve()
    raise BenchError(f"--compare-llama-cpp needs --model to be a .gguf file (or bundled), not {model!r}")


def llama_cpp_command(python: str, gguf: Path, host: str, port: int, threads: int) -> list[str]:
    """llama-cpp-python's OpenAI server on ``gguf``: it runs one request at a time, on ``threads`` threads."""
    return [python, "-m", "llama_cpp.server", "--model", str(gguf), "--n_threads", str(threads),
            "--n_threads_batch", str(threads), "--host", host, "--port", str(port)]  # fmt: skip


def bench_llama_cpp(args: argparse.Namespace, config: LoadConfig, out_dir: Path, run: EngineRun) -> None:
    """Start llama-cpp-python's server on the same GGUF file, run the --compare-url workload on it, stop it."""
    gguf = gguf_file_of(args.model)
    port = pick_free_port(args.host)
    log_path = out_dir / "server-llama-cpp.log"
    log_file = log_path.open("wb")
    command = llama_cpp_command(args.compare_llama_cpp, gguf, args.host, port, args.compare_threads)
    LOG.info("[%s] starting %s (log: %s)", args.compare_label, " ".join(command), log_path)
    # llama.cpp's own OpenMP threads wait as it chose, not as textgen's defaults (set in this process when
    # it imported textgen) would make them.
    from textgen.openmp import without_defaults

    process = subprocess.Popen(
        command,
        env=without_defaults(os.environ),
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    server = Server(args.compare_label, process, f"http://{args.host}:{port}", log_path, log_file)
    try:
        deadline = time.monotonic() + args.startup_timeout
        while True:
            ensure_alive(server)
            with contextlib.suppress(BenchError):
                wait_until_ready_openai(server.base_url, min(5.0, max(0.0, deadline - time.monotonic())))
                break
            if time.monotonic() >= deadline:
                raise server_failure(server, f"/v1/models not 200 after {args.startup_timeout:.0f}s")
        run.servers[args.compare_label] = {"server": "llama-cpp-python", "threads": str(args.compare_threads),
                                           "model": gguf.name}  # fmt: skip
        # Its server has no ignore_eos: min_tokens holds the end-of-sequence token back up to max_tokens.
        config = dataclasses.replace(config, extra_fields=(("min_tokens", config.max_new_tokens),))
        asyncio.run(run_levels(server.base_url, args.compare_label, [Mode.OPENAI.value], args, config, server, run))
    finally:
        stop_server(server)


def wait_until_ready_openai(base_url: str, timeout_s: float) -> None:
    """Poll ``GET /v1/models`` (every OpenAI-compatible server has it) until 200."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=base_url, timeout=5.0, trust_env=False) as client:
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if client.get("/v1/models").status_code == 200:
                    return
            time.sleep(READY_POLL_S)
    raise BenchError(f"{base_url}/v1/models not 200 after {timeout_s:.0f}s")


def bench_url(args: argparse.Namespace, config: LoadConfig, run: EngineRun) -> None:
    """Benchmark an already running server (no RSS: its process is not ours)."""
    wait_until_ready(args.url, args.startup_timeout)
    asyncio.run(run_levels(args.url, args.label, args.modes, args, config, None, run))


# --- metadata and output ------------------------------------------------------------------------------


def cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return None


def gpu_names() -> list[str]:
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in done.stdout.splitlines() if line.strip()]


def machine_info() -> dict[str, Any]:
    return {
        "processor": platform.processor(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "gpus": gpu_names(),
    }


def args_record(args: argparse.Namespace) -> dict[str, Any]:
    return {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}


def build_metadata(
    args: argparse.Namespace, models: set[str], started: datetime, run: EngineRun | None = None
) -> dict[str, Any]:
    return {
        "load_avg_at_start": list(LOAD_AT_START),
        "servers": {} if run is None else run.servers,
        "core_rates": {} if run is None else run.core_rates,
        "compare_label": args.compare_label if args.compare_url or args.compare_llama_cpp else None,
        "date": started.isoformat(timespec="seconds"),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": ", ".join(sorted(models)) or None,
        "machine": machine_info(),
        "args": args_record(args),
        "server": "external" if args.url else "uvicorn main:app, one per engine",
        "textgen_env": {key: value for key, value in os.environ.items() if key.startswith("TEXTGEN_")},
    }


def measure_mask_cost(args: argparse.Namespace, run: EngineRun) -> None:
    """After a json-mode run on a local server: the token masks' cost per step, for C=1 and the largest C."""
    if Mode.JSON not in args.modes or args.url or not run.records:
        return
    from bench.mask_cost import measure_all

    rows = sorted({1, max(args.concurrency)})
    try:
        run.mask_cost = measure_all(os.environ.get("TEXTGEN_MODEL", "bundled"), rows, steps=100)
    except Exception as error:  # a report without this line beats no report
        LOG.warning("mask cost not measured: %s", error)


def write_outputs(out_dir: Path, run: EngineRun, args: argparse.Namespace, started: datetime) -> None:
    if not run.records:
        LOG.warning("no level finished; nothing written to %s", out_dir)
        return
    metadata = build_metadata(args, run.models, started, run)
    if run.mask_cost:
        metadata["mask_cost"] = run.mask_cost
    paths = write_reports(out_dir, run.records, metadata)
    LOG.info("wrote %s", ", ".join(str(path) for path in paths))


LOAD_AT_START: list[float] = []
Target = Callable[[argparse.Namespace, LoadConfig, Path, EngineRun], None]


def bench_targets(args: argparse.Namespace) -> list[Target]:
    """What this run drives, in order: an external --url, or our engines (batched once per --weights),
    then the --compare-url server."""
    if args.url:
        return [lambda a, c, _o, r: bench_url(a, c, r)]
    targets: list[Target] = []
    for engine in args.engines:
        for weights in args.weights if engine == "batched" else ["auto"]:
            targets.append(lambda a, c, o, r, e=engine, w=weights: bench_engine(e, a, c, o, r, w))
    if args.compare_url:
        targets.append(lambda a, c, _o, r: bench_compare(a, c, r))
    if args.compare_llama_cpp:
        targets.append(bench_llama_cpp)
    return targets


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    args = parse_args(argv)
    if args.model is not None:  # the servers, bench.core_rate and the mask cost all read it from here
        os.environ["TEXTGEN_MODEL"] = args.model
    out_dir = args.out.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    config = LoadConfig(max_new_tokens=args.max_new_tokens, request_timeout_s=args.request_timeout)
    started = datetime.now(UTC)
    LOAD_AT_START[:] = os.getloadavg()
    LOG.info("load average (1/5/15 min): %.2f %.2f %.2f", *LOAD_AT_START)
    if args.batch:
        from bench.batch_api import bench_batch, render

        print(render(bench_batch(args, config, out_dir)))
        return 0
    run = EngineRun()
    status = 0
    try:
        for target in bench_targets(args):
            try:
                target(args, config, out_dir, run)
            except BenchError as error:
                LOG.error("%s", error)
                status = 1
            write_outputs(out_dir, run, args, started)
        measure_mask_cost(args, run)
        if run.mask_cost:
            write_outputs(out_dir, run, args, started)
    except KeyboardInterrupt:
        LOG.warning("interrupted")
        write_outputs(out_dir, run, args, started)
        status = 130
    if run.records:
        print(render_table(run.records))
    return status


if __name__ == "__main__":
    sys.exit(main())
