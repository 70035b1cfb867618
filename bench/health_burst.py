"""`/health` latency while a burst of generations arrives at once (issue 20: p99 under a burst).

    python -m bench.health_burst --url http://127.0.0.1:8000                 # 120 requests, 32 tokens
    python -m bench.health_burst --url ... --requests 120 --max-new-tokens 32 --rounds 3

Against a running server: each round sends ``--requests`` /generate requests at once while one client
asks GET /health every ``--probe-ms`` on its own connection, from the first request until the last
answer. Prints /health p50/p99/max over all rounds, the burst's statuses, the generated tokens per
second and the load average (on a shared machine the tail is only comparable at similar load).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import os
import statistics
import time
from typing import Any

import httpx

LOG = logging.getLogger("bench.health_burst")
PROMPT = "Write a short story about a robot who learns to paint."


async def probe_health(client: httpx.AsyncClient, stop: asyncio.Event, interval_s: float) -> list[float]:
    latencies = []
    while not stop.is_set():
        started = time.perf_counter()
        response = await client.get("/health")
        latencies.append(time.perf_counter() - started)
        response.raise_for_status()
        await asyncio.sleep(interval_s)
    return latencies


async def one_generation(client: httpx.AsyncClient, max_new_tokens: int) -> tuple[int, int]:
    body = {"prompt": PROMPT, "max_new_tokens": max_new_tokens, "ignore_eos": True, "temperature": 0.8}
    response = await client.post("/generate", json=body)
    tokens = response.json().get("completion_tokens", 0) if response.status_code == 200 else 0
    return response.status_code, int(tokens)


async def burst_round(url: str, requests: int, max_new_tokens: int, probe_s: float) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=requests + 1, max_keepalive_connections=requests + 1)
    async with (
        httpx.AsyncClient(base_url=url, timeout=300, limits=limits, trust_env=False) as burst,
        httpx.AsyncClient(base_url=url, timeout=60, trust_env=False) as prober,
    ):
        await prober.get("/health")  # connected before the burst
        stop = asyncio.Event()
        probing = asyncio.create_task(probe_health(prober, stop, probe_s))
        started = time.perf_counter()
        outcomes = await asyncio.gather(*(one_generation(burst, max_new_tokens) for _ in range(requests)))
        elapsed = time.perf_counter() - started
        stop.set()
        latencies = await probing
    return {
        "health_s": latencies,
        "statuses": collections.Counter(status for status, _ in outcomes),
        "tokens_per_s": sum(tokens for _, tokens in outcomes) / elapsed,
        "elapsed_s": elapsed,
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    load_before = os.getloadavg()
    rounds = [await burst_round(args.url, args.requests, args.max_new_tokens, args.probe_ms / 1e3)
              for _ in range(args.rounds)]
    health = [s for r in rounds for s in r["health_s"]]
    statuses: collections.Counter[int] = sum((r["statuses"] for r in rounds), collections.Counter())
    return {
        "health_ms": {"n": len(health), "p50": 1e3 * statistics.median(health), "p99": 1e3 * percentile(health, 0.99),
                      "max": 1e3 * max(health), "over_100ms": sum(s > 0.1 for s in health)},
        "statuses": dict(statuses),
        "tokens_per_s": [round(r["tokens_per_s"], 1) for r in rounds],
        "burst_s": [round(r["elapsed_s"], 1) for r in rounds],
        "load_avg_before": load_before,
        "load_avg_after": os.getloadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--requests", type=int, default=120)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--probe-ms", type=float, default=10.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    LOG.info("%s", json.dumps(asyncio.run(main_async(args)), indent=1, default=str))


if __name__ == "__main__":
    main()
