"""Speculative decoding on and off, same run: the ``repeat`` and ``open`` workloads (bench/workloads.py).

    python -m bench.speculative                                   # C = 1, 6 requests per workload and server
    python -m bench.speculative --concurrency 1,4 --requests 8 --workloads repeat

Two ``uvicorn main:app`` servers run side by side, one with ``TEXTGEN_SPECULATIVE=off`` and one with the
setting under test (``--mode``, default ``auto``; other ``TEXTGEN_*`` variables pass through to both). For
each workload and concurrency C, requests go to the two servers in alternating rounds of C concurrent
requests, so both see the same machine load (a shared machine's load moves during a run); a server idles
while the other works. Completion tokens over the rounds' wall time give each server's tok/s; the ratio is
on / off. Greedy requests (``repeat``) must produce the same text on both: a difference is reported.
Results go to stdout and ``--out``/speculative.json.

``--compare-url`` adds another OpenAI-compatible server (llama.cpp's ``llama-server``, which does not draft
here) to every round, so the table also gives ``auto`` against it on the same workload and machine load:

    python -m bench.speculative --requests 12 --compare-url http://127.0.0.1:8081 --compare-label llama-server
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO_ROOT))

from bench.bench import (  # noqa: E402
    DEFAULT_OUT,
    Server,
    parse_int_list,
    pick_free_port,
    server_env,
    stop_server,
    wait_until_ready,
)
from bench.workloads import WORKLOADS, chat_payload  # noqa: E402

LOG = logging.getLogger("bench.speculative")
MAX_TOKENS = {"repeat": 256, "open": 128}
COMPARE = "compare"  # the --compare-url server's key among the clients


def start(label: str, mode: str, host: str, out_dir: Path, job_db: Path) -> Server:
    port = pick_free_port(host)
    log_path = out_dir / f"server-speculative-{label}.log"
    log_file = log_path.open("wb")
    env = server_env("batched", job_db) | {"TEXTGEN_SPECULATIVE": mode}
    command = [sys.executable, "-m", "uvicorn", "main:app", "--host", host, "--port", str(port)]
    LOG.info("[%s] starting with TEXTGEN_SPECULATIVE=%s (log: %s)", label, mode, log_path)
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return Server(label, process, f"http://{host}:{port}", log_path, log_file)


async def one(client: httpx.AsyncClient, payload: dict[str, Any]) -> tuple[int, str]:
    response = await client.post("/v1/chat/completions", json=payload)
    response.raise_for_status()
    body = response.json()
    return int(body["usage"]["completion_tokens"]), str(body["choices"][0]["message"]["content"])


async def measure(
    clients: dict[str, httpx.AsyncClient], workload: str, concurrency: int, requests: int
) -> dict[str, Any]:
    tokens = dict.fromkeys(clients, 0)
    seconds = dict.fromkeys(clients, 0.0)
    differing = 0
    rounds = max(1, requests // concurrency)
    for round_index in range(rounds):
        payloads = [
            chat_payload(workload, round_index * concurrency + i, MAX_TOKENS[workload]) for i in range(concurrency)
        ]
        order = list(clients) if round_index % 2 == 0 else list(clients)[::-1]
        texts: dict[str, list[str]] = {}
        for label in order:
            started = time.perf_counter()
            answers = await asyncio.gather(*(one(clients[label], p) for p in payloads))
            seconds[label] += time.perf_counter() - started
            tokens[label] += sum(count for count, _ in answers)
            texts[label] = [text for _, text in answers]
        if workload == "repeat":
            differing += sum(a != b for a, b in zip(texts["off"], texts["on"], strict=True))
    rate = {label: tokens[label] / seconds[label] for label in clients}
    return {
        "workload": workload,
        "concurrency": concurrency,
        "requests": rounds * concurrency,
        "tokens_per_s": rate,
        "ratio": rate["on"] / rate["off"],
        "ratio_vs_compare": rate["on"] / rate[COMPARE] if COMPARE in rate else None,
        "completion_tokens": tokens,
        "greedy_differences": differing if workload == "repeat" else None,
    }


async def run(args: argparse.Namespace, servers: dict[str, Server]) -> list[dict[str, Any]]:
    timeout = httpx.Timeout(args.request_timeout)
    urls = {label: server.base_url for label, server in servers.items()}
    if args.compare_url:
        urls[COMPARE] = args.compare_url.rstrip("/")
    clients = {label: httpx.AsyncClient(base_url=url, timeout=timeout, trust_env=False) for label, url in urls.items()}
    rows = []
    try:
        for client in clients.values():  # one warm request each (first-request costs)
            await one(client, chat_payload("open", 0, 8))
        for workload in args.workloads:
            for concurrency in args.concurrency:
                row = await measure(clients, workload, concurrency, args.requests)
                LOG.info(
                    "%s C=%d: off %.1f tok/s, %s %.1f tok/s, ratio %.2f%s", workload, concurrency,
                    row["tokens_per_s"]["off"], args.mode, row["tokens_per_s"]["on"], row["ratio"],
                    f", greedy texts differing: {row['greedy_differences']}" if workload == "repeat" else "",
                )
                if row["ratio_vs_compare"] is not None:
                    LOG.info("%s C=%d: %s %.1f tok/s, %s / it %.2f", workload, concurrency, args.compare_label,
                             row["tokens_per_s"][COMPARE], args.mode, row["ratio_vs_compare"])
                rows.append(row)
    finally:
        for client in clients.values():
            await client.aclose()
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.speculative", description=__doc__.split("\n")[0])
    parser.add_argument("--mode", default="auto", choices=["auto", "ngram"], help="the setting under test")
    parser.add_argument("--workloads", type=lambda s: s.split(","), default=list(WORKLOADS))
    parser.add_argument("--concurrency", type=parse_int_list, default=[1])
    parser.add_argument("--requests", type=int, default=6, help="requests per workload, level and server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument("--request-timeout", type=float, default=900.0)
    parser.add_argument("--compare-url", default=None, help="also drive this OpenAI-compatible server each round")
    parser.add_argument("--compare-label", default="compare", help="its name in the table (default 'compare')")
    args = parser.parse_args(argv)
    unknown = set(args.workloads) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workloads {sorted(unknown)}; known: {', '.join(WORKLOADS)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        servers: dict[str, Server] = {}
        try:
            for label, mode in (("off", "off"), ("on", args.mode)):
                servers[label] = start(label, mode, args.host, args.out, Path(scratch) / f"jobs-{label}.db")
            for server in servers.values():
                wait_until_ready(server.base_url, args.startup_timeout, server)
            rows = asyncio.run(run(args, servers))
        finally:
            for server in servers.values():
                stop_server(server)
    compared = f" | {args.compare_label} tok/s | {args.mode} / {args.compare_label}" if args.compare_url else ""
    print(f"| workload | C | off tok/s | {args.mode} tok/s | ratio{compared} |")
    print("|---|---:|---:|---:|---:" + ("|---:|---:" if args.compare_url else "") + "|")
    for row in rows:
        rate = row["tokens_per_s"]
        cells = [row["workload"], str(row["concurrency"]), f"{rate['off']:.1f}", f"{rate['on']:.1f}"]
        cells.append(f"{row['ratio']:.2f}x")
        if row["ratio_vs_compare"] is not None:
            cells += [f"{rate[COMPARE]:.1f}", f"{row['ratio_vs_compare']:.2f}x"]
        print("| " + " | ".join(cells) + " |")
    (args.out / "speculative.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
