"""Two engines in one process sharing the cores (textgen.cpu_share.CoreShare), as ratios of one run.

    python -m bench.engine_share                                   # the bundled model twice, C=8 each
    python -m bench.engine_share --second-model /path/model.gguf --concurrency 8 --requests 32 --rounds 2

No HTTP: two models are loaded in this process and each gets a ``BatchedEngine`` on the one ``CoreShare``
the server builds per process (``create_engine(settings, loaded, cores)``), exactly as several models of one
server share it (built like ``create_engine`` builds them, keeping the loaded weights so that B can be built
again each round). Each phase drives engines with C clients each in a closed loop (``--requests`` requests of
64 tokens per busy engine, sampled, ``ignore_eos``):

- ``a-alone``: A busy, B not built; ``b-alone``: B busy while A is idle;
- ``a-beside-idle``: A busy while B is started and idle (target: >= 0.95x of ``a-alone``);
- ``both``: A and B busy at once (target: each >= 0.4x of its alone figure);
- ``a-alone-after``: A busy again once B is stopped.

Every round runs the phases back to back and ratios are taken within the round (a drifting machine moves
both sides together); A beside idle B is compared with the mean of A alone before and after it, so a
steady drift cancels. On a machine others share, wall-clock rates move by more than the 5% asked of an
idle model; so for that comparison the bench also gives this process's CPU seconds per output token
(whatever an idle engine spins or wakes for, and whatever it slows A's own threads by, shows there) and
the CPU the idle engine's own thread took. The summary gives each ratio's median over the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO_ROOT))

from bench.bench import PROMPTS  # noqa: E402
from textgen.config import Settings, load_settings  # noqa: E402
from textgen.cpu_share import CoreShare  # noqa: E402
from textgen.engine import (  # noqa: E402
    BatchedEngine,
    Engine,
    GenerationRequest,
    SamplingParams,
    core_options_from_settings,
    cores_from_settings,
    limits_from_settings,
)
from textgen.loader import LoadedModel, load_model  # noqa: E402

LOG = logging.getLogger("bench.engine_share")


@dataclass(frozen=True)
class Rate:
    tokens: int
    wall_s: float

    @property
    def per_s(self) -> float:
        return self.tokens / self.wall_s


def thread_cpu_s(native_id: int) -> float:
    """A thread of this process: its CPU seconds so far, to the nanosecond (schedstat's time on a CPU; an
    idle engine's wake-ups take microseconds, far below /proc's 10 ms ticks); 0 where /proc cannot say."""
    try:
        return int(Path(f"/proc/self/task/{native_id}/schedstat").read_text().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


async def drive(engine: Engine, concurrency: int, total: int, max_new_tokens: int) -> Rate:
    """The output tokens of ``total`` requests sent by ``concurrency`` clients back to back, and the time."""
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.8, top_p=0.95, ignore_eos=True)
    counter = itertools.count()
    tokens = 0

    async def client() -> None:
        nonlocal tokens
        while (index := next(counter)) < total:
            result = await engine.submit(GenerationRequest(PROMPTS[index % len(PROMPTS)], params)).result()
            tokens += result.completion_tokens

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return Rate(tokens, time.perf_counter() - started)


def build_engine(settings: Settings, loaded: LoadedModel, cores: CoreShare) -> BatchedEngine:
    """What ``create_engine`` builds, except that the model's weights stay (the next round builds again)."""
    return BatchedEngine(
        loaded,
        limits_from_settings(settings),
        core_options=core_options_from_settings(settings),
        warmup=settings.warmup,
        cores=cores,
    )


async def run(args: argparse.Namespace) -> dict[str, list[float]]:
    settings_a = load_settings(model=args.model) if args.model else load_settings()
    settings_b = load_settings(model=args.second_model) if args.second_model else settings_a
    cores = cores_from_settings(settings_a)  # one per process, as the server builds it
    LOG.info("threads: %s; loading the models", cores.describe())
    loaded_a, loaded_b = load_model(settings_a), load_model(settings_b)
    found: dict[str, list[float]] = {}

    async def phase(name: str, busy: Sequence[Engine], idle: BatchedEngine | None = None) -> list[float]:
        cpu = time.process_time()
        idle_thread = getattr(getattr(idle, "_thread", None), "native_id", None)
        idle_cpu = thread_cpu_s(idle_thread) if idle_thread else 0.0
        rates = await asyncio.gather(*(drive(e, args.concurrency, args.requests, args.max_new_tokens) for e in busy))
        cpu_per_token_ms = 1000 * (time.process_time() - cpu) / sum(rate.tokens for rate in rates)
        found.setdefault(f"{name}: process CPU ms per token", []).append(cpu_per_token_ms)
        detail = ""
        if idle_thread:
            idle_ms_per_s = 1000 * (thread_cpu_s(idle_thread) - idle_cpu) / max(rate.wall_s for rate in rates)
            found.setdefault(f"{name}: the idle engine's thread, CPU ms per s", []).append(idle_ms_per_s)
            detail = f"; the idle engine's thread used {idle_ms_per_s:.2f} ms of CPU per s"
        LOG.info(
            "%s: %s tok/s, %.2f ms of process CPU per token%s",
            name,
            " / ".join(f"{rate.per_s:.1f}" for rate in rates),
            cpu_per_token_ms,
            detail,
        )
        return [rate.per_s for rate in rates]

    a = build_engine(settings_a, loaded_a, cores)
    await a.start()
    try:
        for round_index in range(args.rounds):
            LOG.info("round %d", round_index + 1)
            (alone_a,) = await phase("a-alone", [a])
            b = build_engine(settings_b, loaded_b, cores)
            await b.start()  # started and warmed up, then idle
            try:
                (beside_idle,) = await phase("a-beside-idle", [a], idle=b)
                (alone_b,) = await phase("b-alone (a idle)", [b], idle=a)
                both_a, both_b = await phase("both", [a, b])
            finally:
                await b.stop(1)
            (alone_a_after,) = await phase("a-alone-after", [a])
            phases = ("a-alone", "a-beside-idle", "a-alone-after")
            cpu = {name: found[f"{name}: process CPU ms per token"][-1] for name in phases}
            for key, value in (
                ("a beside idle b / a alone (mean of before and after)", 2 * beside_idle / (alone_a + alone_a_after)),
                (
                    "a beside idle b / a alone: process CPU per token",
                    2 * cpu["a-beside-idle"] / (cpu["a-alone"] + cpu["a-alone-after"]),
                ),
                ("a in both / a alone", both_a / alone_a),
                ("b in both / b alone", both_b / alone_b),
            ):
                found.setdefault(key, []).append(value)
    finally:
        await a.stop(1)
    return found


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    parser = argparse.ArgumentParser(prog="python -m bench.engine_share", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model A (default: TEXTGEN_MODEL)")
    parser.add_argument("--second-model", default=None, help="model B (default: the same as A, loaded again)")
    parser.add_argument("--concurrency", type=int, default=8, help="clients per busy engine (default 8)")
    parser.add_argument("--requests", type=int, default=32, help="requests per busy engine and phase (default 32)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    if min(args.concurrency, args.requests, args.rounds, args.max_new_tokens) < 1:
        parser.error("--concurrency, --requests, --rounds and --max-new-tokens must be >= 1")
    LOG.info("load average (1/5/15 min): %.2f %.2f %.2f", *os.getloadavg())
    found = asyncio.run(run(args))
    for key, values in found.items():
        shown = ", ".join(f"{value:.2f}" for value in values)
        unit = "x" if " / " in key else ""
        print(f"- {key}: median {statistics.median(values):.2f}{unit} ({shown})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
