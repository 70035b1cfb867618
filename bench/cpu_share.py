"""Cores shared between workers and with a busy neighbour, stated as ratios of one run.

    python -m bench.cpu_share                                   # C=16, 64 requests of 64 tokens, 2 rounds
    python -m bench.cpu_share --cases one,two --rounds 3 --requests 96
    python -m bench.cpu_share --model /path/model.gguf --concurrency 8

Each case starts a real ``uvicorn main:app`` (bench.bench's server set-up: throw-away job store, deep queue),
waits until every worker has started, warms up, and drives ``/v1/completions`` with C clients in a closed
loop (64 new tokens each, ``ignore_eos``); then stops it. Cases:

- ``one``: one worker, the reference;
- ``two``: ``--workers 2`` (the target: C total >= 0.8x of ``one``);
- ``two-fixed``: ``--workers 2`` with ``TEXTGEN_ADAPTIVE_THREADS=false``: every step on all cores, as before;
- ``neighbour``: one worker while another process keeps one core busy (a Python spin loop);
- ``neighbour-fixed``: the same with ``TEXTGEN_ADAPTIVE_THREADS=false``.

Every round runs all cases back to back and each case's ratio is taken against ``one`` of the same round,
so a machine whose speed drifts (other tenants) moves both sides of a ratio together; the summary is each
case's median ratio over the rounds. Results: a table on stdout and ``cpu-share.json`` in ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO_ROOT))

from bench.bench import (  # noqa: E402
    DEFAULT_OUT,
    BenchError,
    LoadConfig,
    Server,
    ensure_alive,
    log_tail,
    run_level,
    start_server,
    stop_server,
    wait_until_ready,
    warm_up,
)
from bench.stats import Mode  # noqa: E402

LOG = logging.getLogger("bench.cpu_share")
REFERENCE = "one"
STARTED_LINE = b"Application startup complete."  # uvicorn logs it once per worker


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    workers: int
    adaptive: bool
    neighbour: bool


CASES = {
    case.name: case
    for case in (
        Case("one", 1, True, False),
        Case("two", 2, True, False),
        Case("two-fixed", 2, False, False),
        Case("neighbour", 1, True, True),
        Case("neighbour-fixed", 1, False, True),
    )
}


def parse_cases(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in CASES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"cases are {', '.join(CASES)}; got {text!r}")
    return [REFERENCE, *(name for name in names if name != REFERENCE)]  # the reference always runs, first


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_share", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=parse_cases, default=list(CASES), help=f"default: {','.join(CASES)}")
    parser.add_argument("--concurrency", type=int, default=16, help="clients in the closed loop (default 16)")
    parser.add_argument("--requests", type=int, default=64, help="requests per case and round (default 64)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="every case once per round (default 2)")
    parser.add_argument("--model", default=None, help="TEXTGEN_MODEL for the servers (default: the environment's)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument("--request-timeout", type=float, default=900.0)
    return parser


def case_env(case: Case, model: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env["TEXTGEN_ADAPTIVE_THREADS"] = "true" if case.adaptive else "false"
    if model is not None:
        env["TEXTGEN_MODEL"] = model
    return env


def wait_for_workers(server: Server, workers: int, timeout_s: float) -> None:
    """/ready answers as soon as one worker is up; a level must not start while another still loads."""
    deadline = time.monotonic() + timeout_s
    while server.log_path.read_bytes().count(STARTED_LINE) < workers:
        ensure_alive(server)
        if time.monotonic() > deadline:
            raise BenchError(f"[{server.engine}] {workers} workers not started after {timeout_s:.0f}s:\n"
                             f"{log_tail(server.log_path)}")  # fmt: skip
        time.sleep(0.5)


def start_neighbour() -> subprocess.Popen[bytes]:
    """A process that keeps one core busy for as long as it lives."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL)


def stop_neighbour(process: subprocess.Popen[bytes]) -> None:
    process.kill()
    process.wait()


def run_case(case: Case, args: argparse.Namespace, config: LoadConfig, round_index: int) -> dict[str, Any]:
    label = f"{case.name}-r{round_index + 1}"
    with tempfile.TemporaryDirectory(prefix="textgen-cpu-share-") as tmp:
        server = start_server(
            "batched", args.host, 0, args.out, Path(tmp) / "jobs.db",
            workers=case.workers, label=label, env=case_env(case, args.model),
        )  # fmt: skip
        neighbour = None
        try:
            wait_until_ready(server.base_url, args.startup_timeout, server)
            wait_for_workers(server, case.workers, args.startup_timeout)
            asyncio.run(warm_up(server.base_url, config, label, [Mode.OPENAI.value]))
            if case.neighbour:
                neighbour = start_neighbour()
                time.sleep(1.5)  # the server's next load reading sees the neighbour (0.5 s intervals)
            stats = asyncio.run(
                run_level(server.base_url, label, Mode.OPENAI.value, args.concurrency, args.requests, config,
                          server.process.pid)
            )  # fmt: skip
        finally:
            if neighbour is not None:
                stop_neighbour(neighbour)
            stop_server(server)
    if stats.completed < args.requests:
        LOG.warning("[%s] %d of %d requests completed", label, stats.completed, args.requests)
    return {
        "case": case.name,
        "round": round_index + 1,
        "tokens_per_s": stats.output_throughput,
        "completed": stats.completed,
        "p95_ms": stats.p95_e2el_ms,
        "load_avg_1m": stats.load_avg_1m,
    }


def ratios(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[float]]:
    """Each case's tokens/s over the reference's of the same round."""
    reference = {row["round"]: row["tokens_per_s"] for row in rows if row["case"] == REFERENCE}
    found: dict[str, list[float]] = {}
    for row in rows:
        base = reference.get(row["round"])
        if row["case"] != REFERENCE and base:
            found.setdefault(row["case"], []).append(row["tokens_per_s"] / base)
    return found


def render(rows: Sequence[Mapping[str, Any]], concurrency: int) -> str:
    lines = [
        f"| case | round | C | out tok/s | vs {REFERENCE} (same round) | load 1m |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    reference = {row["round"]: row["tokens_per_s"] for row in rows if row["case"] == REFERENCE}
    for row in rows:
        base = reference.get(row["round"])
        ratio = f"{row['tokens_per_s'] / base:.2f}x" if base and row["case"] != REFERENCE else "-"
        lines.append(f"| {row['case']} | {row['round']} | {concurrency} | {row['tokens_per_s']:.1f} | {ratio} | "
                     f"{row['load_avg_1m']:.2f} |")  # fmt: skip
    lines.append("")
    for case, values in ratios(rows).items():
        shown = ", ".join(f"{value:.2f}" for value in values)
        lines.append(f"- {case} / {REFERENCE}: median {statistics.median(values):.2f}x ({shown})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    if min(args.concurrency, args.requests, args.rounds, args.max_new_tokens) < 1:
        raise SystemExit("--concurrency, --requests, --rounds and --max-new-tokens must be >= 1")
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    config = LoadConfig(max_new_tokens=args.max_new_tokens, request_timeout_s=args.request_timeout)
    LOG.info("load average (1/5/15 min): %.2f %.2f %.2f", *os.getloadavg())
    rows: list[dict[str, Any]] = []
    status = 0
    try:
        for round_index in range(args.rounds):
            for name in args.cases:
                try:
                    rows.append(run_case(CASES[name], args, config, round_index))
                except BenchError as error:
                    LOG.error("%s", error)
                    status = 1
    except KeyboardInterrupt:
        status = 130
    summary = {"concurrency": args.concurrency, "rows": rows, "ratios": ratios(rows), "model": args.model,
               "cpu_count": os.cpu_count(), "argv": list(argv if argv is not None else sys.argv[1:])}  # fmt: skip
    (args.out / "cpu-share.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(render(rows, args.concurrency))
    return status


if __name__ == "__main__":
    sys.exit(main())
