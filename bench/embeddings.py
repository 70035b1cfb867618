"""What embedding requests cost running streams: 32 generation streams alone, then beside 64 concurrent
embedding requests, then alone again, on one batched server.

    python -m bench.embeddings                                   # 32 streams, 64 embedders, 30 s per phase
    python -m bench.embeddings --streams 2 --embedders 2 --duration 2 --ramp 1 --max-new-tokens 16   # smoke
    python -m bench.embeddings --url http://127.0.0.1:8000        # an already running server
    python -m bench.embeddings --engine-only                      # the engine in-process: no HTTP at all

A real ``uvicorn main:app`` is started as ``bench.bench`` starts one (batched engine, a throw-away job store,
other ``TEXTGEN_*`` variables pass through), unless ``--url`` is given. Each phase starts its workers, lets
them ramp up for ``--ramp`` seconds, then counts for ``--duration`` seconds:

* streams: ``--streams`` closed-loop clients, each streaming ``/v1/completions`` (``ignore_eos``,
  ``--max-new-tokens``) back to back. Their tok/s is the server's own count of decoded tokens in the
  window (the sum of ``textgen_engine_batch_size`` on ``/metrics``: every decode step adds one token per
  running stream, and nothing else decodes), read at the window's start and end; the text chunks the
  clients received in the window are reported beside it (the content filter's hold-back can merge
  tokens into one chunk, so chunks undercount tokens);
* embedders (middle phase only): ``--embedders`` closed-loop clients, each sending ``/v1/embeddings`` with
  ``--embedding-inputs`` texts of about ``--embedding-words`` words back to back.

``--engine-only`` drives the same workload straight into an in-process engine (``TEXTGEN_*`` settings,
the bundled model by default; decoded tokens counted by the step observer), so what the engine's
pacing costs the streams is seen apart from the HTTP work of the requests and from a load generator
sharing the server's cores.

The figure of merit is ``ratio = streams' tok/s beside the embedders / mean of the two alone phases``
(the issue's target: at least 0.8, i.e. embeddings cost the streams at most 20%). The two alone phases
bracket the middle one so that drift (thermal, other load) shows. Results go to stdout (a table) and to
``--out``/embeddings.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as ``python bench/embeddings.py``
    sys.path.insert(0, str(REPO_ROOT))

from bench.bench import (  # noqa: E402
    OPENAI_MODEL,
    PROMPTS,
    TEMPERATURE,
    add_server_arguments,
    make_client,
    served,
)

LOG = logging.getLogger("bench.embeddings")
TARGET_RATIO = 0.8
DECODED_TOKENS_METRIC = "textgen_engine_batch_size_sum"


@dataclass
class PhaseCounts:
    """What the workers saw; only events inside [start, end) count."""

    start: float = 0.0
    end: float = float("inf")
    chunks: int = 0  # streamed text chunks in the window
    decoded_tokens: float = 0.0  # the server's count over the window
    stream_failures: int = 0
    embeddings: int = 0
    embedded_tokens: int = 0
    embedding_latencies: list[float] = field(default_factory=list)
    embedding_failures: int = 0

    def inside(self, moment: float) -> bool:
        return self.start <= moment < self.end


@dataclass(frozen=True)
class PhaseResult:
    name: str
    seconds: float
    stream_tok_s: float
    stream_chunks_s: float
    stream_failures: int
    embeddings_per_s: float
    embedded_tok_s: float
    embedding_p50_s: float | None
    embedding_p95_s: float | None
    embedding_failures: int


def stream_body(index: int, max_new_tokens: int) -> dict[str, Any]:
    return {
        "model": OPENAI_MODEL,
        "prompt": PROMPTS[index % len(PROMPTS)],
        "max_tokens": max_new_tokens,
        "temperature": TEMPERATURE,
        "ignore_eos": True,
        "stream": True,
    }


def embedding_text(index: int, words: int) -> str:
    """About ``words`` words of ordinary prose, different for consecutive requests."""
    pieces: list[str] = []
    offset = index
    while sum(len(p.split()) for p in pieces) < words:
        pieces.append(PROMPTS[offset % len(PROMPTS)])
        offset += 1
    return " ".join(" ".join(pieces).split()[:words])


async def stream_worker(client: httpx.AsyncClient, worker: int, max_new_tokens: int, counts: PhaseCounts) -> None:
    index = worker
    while True:
        try:
            async with client.stream("POST", "/v1/completions", json=stream_body(index, max_new_tokens)) as reply:
                if reply.status_code != 200:
                    await reply.aread()
                    raise httpx.HTTPStatusError(f"HTTP {reply.status_code}", request=reply.request, response=reply)
                async for line in reply.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    payload = json.loads(line[6:])
                    if "error" in payload:
                        raise RuntimeError(payload["error"].get("message", "stream error"))
                    if payload["choices"] and payload["choices"][0].get("text"):
                        counts.chunks += counts.inside(time.monotonic())
        except (httpx.HTTPError, RuntimeError, ValueError) as error:
            if counts.inside(time.monotonic()):
                counts.stream_failures += 1
                LOG.warning("stream %d failed: %s", worker, error)
        index += 1


async def embedding_worker(
    client: httpx.AsyncClient, worker: int, inputs: int, words: int, counts: PhaseCounts
) -> None:
    index = worker
    while True:
        texts = [embedding_text(index * inputs + i, words) for i in range(inputs)]
        started = time.monotonic()
        try:
            reply = await client.post("/v1/embeddings", json={"model": OPENAI_MODEL, "input": texts})
            ok = reply.status_code == 200
            tokens = int(reply.json()["usage"]["prompt_tokens"]) if ok else 0
        except (httpx.HTTPError, ValueError, KeyError):
            ok, tokens = False, 0
        finished = time.monotonic()
        if counts.inside(finished):
            if ok:
                counts.embeddings += 1
                counts.embedded_tokens += tokens
                counts.embedding_latencies.append(finished - started)
            else:
                counts.embedding_failures += 1
        index += 1


async def run_phase(name: str, base_url: str, args: argparse.Namespace, *, embedders: int) -> PhaseResult:
    counts = PhaseCounts()
    connections = args.streams + embedders + 4
    async with make_client(base_url, connections, args.request_timeout) as client:
        tasks = [
            asyncio.create_task(stream_worker(client, i, args.max_new_tokens, counts)) for i in range(args.streams)
        ]
        tasks += [
            asyncio.create_task(embedding_worker(client, i, args.embedding_inputs, args.embedding_words, counts))
            for i in range(embedders)
        ]
        LOG.info("[%s] %d streams, %d embedders: ramping up %.0fs", name, args.streams, embedders, args.ramp)
        await asyncio.sleep(args.ramp)  # the benchmark's own clock: phases last a set time
        decoded_before = await decoded_tokens(client)
        counts.start = time.monotonic()
        counts.end = counts.start + args.duration
        await asyncio.sleep(args.duration)
        counts.decoded_tokens = await decoded_tokens(client) - decoded_before
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    result = phase_result(name, counts)
    LOG.info("[%s] streams %.1f tok/s, embeddings %.1f req/s", name, result.stream_tok_s, result.embeddings_per_s)
    return result


async def decoded_tokens(client: httpx.AsyncClient) -> float:
    """The server's decoded tokens so far: the sum of the decode batch sizes (one token per running row)."""
    reply = await client.get("/metrics")
    reply.raise_for_status()
    for line in reply.text.splitlines():
        if line.startswith(DECODED_TOKENS_METRIC + " "):
            return float(line.split()[1])
    raise RuntimeError(f"{DECODED_TOKENS_METRIC} is not on /metrics (is the batched engine running?)")


async def warm_up(base_url: str, args: argparse.Namespace) -> None:
    async with make_client(base_url, 4, args.request_timeout) as client:
        reply = await client.post("/v1/embeddings", json={"input": embedding_text(0, args.embedding_words)})
        reply.raise_for_status()
        body = {**stream_body(0, 4), "stream": False}
        (await client.post("/v1/completions", json=body)).raise_for_status()


async def measure(base_url: str, args: argparse.Namespace) -> dict[str, Any]:
    await warm_up(base_url, args)
    phases = [
        await run_phase("alone", base_url, args, embedders=0),
        await run_phase("beside-embeddings", base_url, args, embedders=args.embedders),
        await run_phase("alone-again", base_url, args, embedders=0),
    ]
    return summary(phases, args)


async def measure_engine(args: argparse.Namespace) -> dict[str, Any]:
    """The same phases against an in-process engine: no HTTP, no load generator on the server's cores."""
    from textgen.config import load_settings
    from textgen.engine import create_engine
    from textgen.engine.types import EmbeddingRequest, GenerationRequest, SamplingParams
    from textgen.loader import load_model

    settings = load_settings()
    loaded = await asyncio.to_thread(load_model, settings)
    engine = create_engine(settings, loaded)
    await engine.start()
    decoded = [0]
    engine.set_step_observer(lambda batch, _seconds: decoded.__setitem__(0, decoded[0] + batch))
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=TEMPERATURE, ignore_eos=True)
    tokenizer = loaded.tokenizer

    async def streamer(worker: int) -> None:
        index = worker
        while True:
            await engine.submit(GenerationRequest(PROMPTS[index % len(PROMPTS)], params)).result()
            index += 1

    async def embedder(worker: int, counts: PhaseCounts) -> None:
        index = worker
        while True:
            texts = [
                embedding_text(index * args.embedding_inputs + i, args.embedding_words)
                for i in range(args.embedding_inputs)
            ]
            inputs = tuple(tuple(tokenizer(text).input_ids) for text in texts)
            started = time.monotonic()
            result = await engine.submit_embedding(EmbeddingRequest(inputs=inputs)).result()
            finished = time.monotonic()
            if counts.inside(finished):
                counts.embeddings += 1
                counts.embedded_tokens += result.prompt_tokens
                counts.embedding_latencies.append(finished - started)
            index += 1

    async def phase(name: str, embedders: int) -> PhaseResult:
        counts = PhaseCounts()
        tasks = [asyncio.create_task(streamer(i)) for i in range(args.streams)]
        tasks += [asyncio.create_task(embedder(i, counts)) for i in range(embedders)]
        await asyncio.sleep(args.ramp)  # the benchmark's own clock: phases last a set time
        before, counts.start = decoded[0], time.monotonic()
        counts.end = counts.start + args.duration
        await asyncio.sleep(args.duration)
        counts.decoded_tokens = decoded[0] - before
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return phase_result(name, counts)

    try:
        phases = [await phase("alone", 0), await phase("beside-embeddings", args.embedders)]
        phases.append(await phase("alone-again", 0))
    finally:
        await engine.stop(0)
    return summary(phases, args)


def phase_result(name: str, counts: PhaseCounts) -> PhaseResult:
    seconds = counts.end - counts.start
    latencies = sorted(counts.embedding_latencies)
    return PhaseResult(
        name=name,
        seconds=seconds,
        stream_tok_s=counts.decoded_tokens / seconds,
        stream_chunks_s=counts.chunks / seconds,
        stream_failures=counts.stream_failures,
        embeddings_per_s=counts.embeddings / seconds,
        embedded_tok_s=counts.embedded_tokens / seconds,
        embedding_p50_s=latencies[len(latencies) // 2] if latencies else None,
        embedding_p95_s=latencies[min(len(latencies) - 1, int(len(latencies) * 0.95))] if latencies else None,
        embedding_failures=counts.embedding_failures,
    )


def summary(phases: list[PhaseResult], args: argparse.Namespace) -> dict[str, Any]:
    alone = statistics.fmean([phases[0].stream_tok_s, phases[2].stream_tok_s])
    ratio = phases[1].stream_tok_s / alone if alone > 0 else 0.0
    return {
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "phases": [asdict(p) for p in phases],
        "streams_alone_tok_s": alone,
        "streams_beside_tok_s": phases[1].stream_tok_s,
        "ratio": ratio,
        "cost": 1 - ratio,
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio >= TARGET_RATIO,
    }


def render(result: dict[str, Any]) -> str:
    def number(value: float | None, digits: int = 1) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    lines = [
        "| phase | s | streams tok/s | stream chunks/s | stream failures | embeddings/s | embedded tok/s | p50 s |"
        " p95 s | embedding failures |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in result["phases"]:
        lines.append(
            f"| {p['name']} | {number(p['seconds'])} | {number(p['stream_tok_s'])} | {number(p['stream_chunks_s'])}"
            f" | {p['stream_failures']} | {number(p['embeddings_per_s'])} | {number(p['embedded_tok_s'])}"
            f" | {number(p['embedding_p50_s'], 3)} | {number(p['embedding_p95_s'], 3)} | {p['embedding_failures']} |"
        )
    verdict = "meets" if result["meets_target"] else "MISSES"
    lines.append(
        f"\nstreams beside embeddings / alone = {result['ratio']:.3f} (cost {100 * result['cost']:.1f}%; "
        f"{verdict} the >= {TARGET_RATIO} target)"
    )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=None, help="an already running server (default: start one)")
    parser.add_argument("--engine-only", action="store_true", help="an in-process engine, no server or HTTP")
    parser.add_argument("--streams", type=int, default=32, help="generation streams (default 32)")
    parser.add_argument("--embedders", type=int, default=64, help="concurrent embedding clients (default 64)")
    parser.add_argument("--duration", type=float, default=30.0, help="measured seconds per phase (default 30)")
    parser.add_argument("--ramp", type=float, default=5.0, help="seconds before each phase's window (default 5)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens per stream request (default 128)")
    parser.add_argument("--embedding-inputs", type=int, default=1, help="texts per embedding request (default 1)")
    parser.add_argument("--embedding-words", type=int, default=48, help="words per text (default 48, ~64 tokens)")
    parser.add_argument("--port", type=int, default=0)
    add_server_arguments(parser, request_timeout=600.0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.engine_only:
        result = asyncio.run(measure_engine(args))
        (args.out / "embeddings-engine.json").write_text(json.dumps(result, indent=2) + "\n")
        print(render(result))
        return 0
    with (
        tempfile.TemporaryDirectory(prefix="textgen-bench-embed-") as scratch,
        served(args, Path(scratch) / "jobs.db", port=args.port) as base_url,
    ):
        result = asyncio.run(measure(base_url, args))
    (args.out / "embeddings.json").write_text(json.dumps(result, indent=2) + "\n")
    print(render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
