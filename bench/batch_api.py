"""The Batch API benchmark (``bench.bench --batch``): N short requests as one OpenAI batch vs the same as
concurrent calls.

    python -m bench.bench --batch                                   # 1,000 requests, C = 64, one run
    python -m bench.bench --batch --batch-requests 20 --max-new-tokens 8 --batch-concurrency 4   # smoke

One ``uvicorn main:app`` (batched engine, its own SQLite store and files folder) serves both runs, one
after the other: first the requests as ``POST /v1/completions`` from C concurrent clients (closed loop,
the ``openai`` mode of the load benchmark), then the same requests (same prompts, ``max_tokens``,
``ignore_eos``) uploaded as one JSONL file and run as one batch, timed from upload to ``completed``.
Throughput is generated tokens per second of wall time (tokens from each response's ``usage``); the
ratio batch / concurrent is printed and written to ``batch.json`` in ``--out``.

The server runs ``TEXTGEN_JOB_CONCURRENCY`` batch lines at a time per process; this benchmark sets it to
``TEXTGEN_MAX_RUNNING`` (64 unless set) so background lines can fill the engine's batch just as the
concurrent clients do.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.bench import (
    LoadConfig,
    build_request,
    closed_loop,
    make_client,
    start_server,
    stop_server,
    wait_until_ready,
    warm_up,
)
from bench.stats import Mode, Outcome, RequestResult

LOG = logging.getLogger("bench")
POLL_S = 0.5
ENDED = {"completed", "failed", "cancelled", "expired"}


@dataclass(frozen=True)
class RunResult:
    requests: int
    answered: int
    completion_tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0


def batch_file(requests: int, max_new_tokens: int) -> bytes:
    """The JSONL input: line i is the i-th request of the concurrent run, word for word."""
    lines = []
    for index in range(requests):
        path, body = build_request(Mode.OPENAI.value, index, max_new_tokens)
        lines.append(json.dumps({"custom_id": f"req-{index}", "method": "POST", "url": path, "body": body}))
    return ("\n".join(lines) + "\n").encode()


async def run_concurrent(base_url: str, requests: int, concurrency: int, config: LoadConfig) -> RunResult:
    results: list[RequestResult] = []
    seconds = await closed_loop(base_url, Mode.OPENAI.value, concurrency, requests, config, results)
    done = [r for r in results if r.outcome is Outcome.COMPLETED]
    return RunResult(requests, len(done), sum(r.completion_tokens for r in done), seconds)


async def run_as_batch(base_url: str, requests: int, config: LoadConfig) -> RunResult:
    async with make_client(base_url, 2, config.request_timeout_s) as client:
        started = time.perf_counter()
        files = {"file": ("bench.jsonl", batch_file(requests, config.max_new_tokens), "application/jsonl")}
        uploaded = await client.post("/v1/files", data={"purpose": "batch"}, files=files)
        uploaded.raise_for_status()
        body = {"input_file_id": uploaded.json()["id"], "endpoint": "/v1/completions", "completion_window": "24h"}
        created = await client.post("/v1/batches", json=body)
        created.raise_for_status()
        batch = created.json()
        shown = -1
        while batch["status"] not in ENDED:
            await asyncio.sleep(POLL_S)
            batch = (await client.get(f"/v1/batches/{batch['id']}")).raise_for_status().json()
            if batch["request_counts"]["completed"] // 100 != shown:
                shown = batch["request_counts"]["completed"] // 100
                LOG.info("[batch] %s %d/%d", batch["status"], batch["request_counts"]["completed"], requests)
        seconds = time.perf_counter() - started
        if batch["status"] != "completed" or not batch["output_file_id"]:
            raise RuntimeError(f"the batch ended {batch['status']}: {batch.get('errors')}")
        answered, tokens = 0, 0
        async with client.stream("GET", f"/v1/files/{batch['output_file_id']}/content") as output:
            async for line in output.aiter_lines():
                if line.strip():
                    record = json.loads(line)
                    answered += record["response"]["status_code"] == 200
                    tokens += int(record["response"]["body"]["usage"]["completion_tokens"])
    return RunResult(requests, answered, tokens, seconds)


async def compare(base_url: str, args: argparse.Namespace, config: LoadConfig) -> dict[str, Any]:
    await warm_up(base_url, config, "batch", [Mode.OPENAI.value])
    LOG.info("[concurrent] %d requests, C=%d", args.batch_requests, args.batch_concurrency)
    concurrent = await run_concurrent(base_url, args.batch_requests, args.batch_concurrency, config)
    LOG.info("[batch] %d requests as one batch", args.batch_requests)
    batch = await run_as_batch(base_url, args.batch_requests, config)
    ratio = batch.tokens_per_s / concurrent.tokens_per_s if concurrent.tokens_per_s else 0.0
    return {
        "max_new_tokens": config.max_new_tokens,
        "concurrency": args.batch_concurrency,
        "concurrent": {**asdict(concurrent), "tokens_per_s": round(concurrent.tokens_per_s, 2)},
        "batch": {**asdict(batch), "tokens_per_s": round(batch.tokens_per_s, 2)},
        "ratio": round(ratio, 3),
    }


def render(result: dict[str, Any]) -> str:
    rows = [
        "| run | requests answered | tokens | seconds | tokens/s |",
        "|---|---|---|---|---|",
    ]
    for name in ("concurrent", "batch"):
        run = result[name]
        label = f"{name} (C={result['concurrency']})" if name == "concurrent" else "one batch"
        rows.append(
            f"| {label} | {run['answered']}/{run['requests']} | {run['completion_tokens']} | "
            f"{run['seconds']:.1f} | {run['tokens_per_s']:.1f} |"
        )
    rows.append(f"\nbatch / concurrent tokens/s: **{result['ratio']:.3f}**")
    return "\n".join(rows)


def bench_batch(args: argparse.Namespace, config: LoadConfig, out_dir: Path) -> dict[str, Any]:
    """Start one batched-engine server, compare, stop it; write ``batch.json`` / ``batch.md``."""
    os.environ.setdefault("TEXTGEN_JOB_CONCURRENCY", os.environ.get("TEXTGEN_MAX_RUNNING", "64"))
    with tempfile.TemporaryDirectory(prefix="textgen-bench-batch-") as tmp:
        server = start_server("batched", args.host, args.port, out_dir, Path(tmp) / "jobs.db")
        try:
            wait_until_ready(server.base_url, args.startup_timeout, server)
            result = asyncio.run(compare(server.base_url, args, config))
        finally:
            stop_server(server)
    result["textgen_env"] = {k: v for k, v in os.environ.items() if k.startswith("TEXTGEN_")}
    (out_dir / "batch.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "batch.md").write_text(render(result) + "\n")
    return result
