"""What Ray Serve's HTTP proxy adds to each request, against plain uvicorn, measured in the same run.

    python -m bench.ray_overhead                     # tiny test model, 200 requests per endpoint and server
    python -m bench.ray_overhead --model bundled     # the bundled SmolLM2 (converted once into .cache/)
    python -m bench.ray_overhead --requests 1000 --rounds 10

Both servers run the same app with the same ``TEXTGEN_*`` settings, one at a time per request but both
up for the whole run: ``uvicorn main:app`` (one process) and a local Ray cluster (2 CPUs, no dashboard)
serving ``deploy.ray_serve`` with one replica. Each endpoint (``GET /health``: no model work;
``POST /generate`` with ``max_new_tokens`` 1) gets warm-up requests, then ``--requests`` sequential
requests per server on one keep-alive connection, sent in ``--rounds`` alternating blocks so drift on a
shared machine hits both servers alike. The difference of the medians (and p95s) is the per-request
cost of the proxy hop (proxy -> router -> replica actor) on this machine. Writes
``ray-overhead.json`` and ``ray-overhead.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as ``python bench/ray_overhead.py``: make ``bench`` importable
    sys.path.insert(0, str(REPO_ROOT))

from bench.bench import Server, machine_info, pick_free_port, stop_server, wait_until_ready  # noqa: E402
from bench.stats import mean, percentile  # noqa: E402

LOG = logging.getLogger("bench.ray_overhead")

DEFAULT_OUT = REPO_ROOT / "bench" / "results"
NAME = "ray-overhead"
HOST = "127.0.0.1"
STARTUP_TIMEOUT_S = 300.0
REQUEST_TIMEOUT_S = 60.0
OBJECT_STORE_BYTES = 100 * 1024 * 1024
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
SERVERS = ("uvicorn", "ray-serve")


@dataclass(frozen=True, slots=True)
class Endpoint:
    label: str
    method: str
    path: str
    body: Mapping[str, Any] | None = None


ENDPOINTS = (
    Endpoint("GET /health", "GET", "/health"),
    Endpoint(
        "POST /generate (1 token)",
        "POST",
        "/generate",
        {"prompt": "The future of AI is", "max_new_tokens": 1, "temperature": 0},
    ),
)


@dataclass(frozen=True, slots=True)
class Latencies:
    """Client-side wall time of one server's requests to one endpoint, in milliseconds."""

    endpoint: str
    server: str
    n: int
    median_ms: float
    p95_ms: float
    mean_ms: float

    @classmethod
    def of(cls, endpoint: str, server: str, seconds: Sequence[float]) -> Latencies:
        ms = [value * 1000 for value in seconds]
        return cls(
            endpoint, server, len(ms), _required(percentile(ms, 50)), _required(percentile(ms, 95)), _required(mean(ms))
        )


def _required(value: float | None) -> float:
    if value is None:
        raise ValueError("no latencies recorded")
    return value


# --- command line -------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--model", default="tiny", help="'tiny' (the test model, built in a temp dir), 'bundled', or a folder"
    )
    parser.add_argument("--requests", type=int, default=200, help="timed requests per endpoint and server")
    parser.add_argument("--warmup", type=int, default=20, help="untimed requests per endpoint and server first")
    parser.add_argument("--rounds", type=int, default=10, help="alternating blocks the timed requests are split into")
    parser.add_argument("--torch-threads", type=int, default=1, help="TEXTGEN_TORCH_THREADS for both servers")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where ray-overhead.json/.md go")
    args = parser.parse_args(argv)
    if args.requests < args.rounds or args.rounds < 1 or args.warmup < 0:
        parser.error("need --rounds >= 1, --requests >= --rounds and --warmup >= 0")
    return args


# --- servers ------------------------------------------------------------------------------------------


def model_setting(model: str, work_dir: Path) -> str:
    if model != "tiny":
        return model
    from tests.support.tiny_model import save_tiny_gpt2

    return str(save_tiny_gpt2(work_dir / "tiny-gpt2"))


def textgen_env(model: str, torch_threads: int) -> dict[str, str]:
    """The settings both servers get (each its own SQLite job store: no jobs run here)."""
    return {
        "TEXTGEN_MODEL": model,
        "TEXTGEN_DTYPE": "float32",
        "TEXTGEN_CACHE_DIR": str(REPO_ROOT / ".cache" / "textgen"),
        "TEXTGEN_TORCH_THREADS": str(torch_threads),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(REPO_ROOT),
    }


@contextlib.contextmanager
def uvicorn_server(env: Mapping[str, str], work_dir: Path) -> Iterator[str]:
    port = pick_free_port(HOST)
    log_path = work_dir / "uvicorn.log"
    log_file = log_path.open("wb")
    full_env = {**os.environ, **env, "TEXTGEN_JOB_STORE": f"sqlite:///{work_dir / 'uvicorn-jobs.db'}"}
    command = [sys.executable, "-m", "uvicorn", "main:app", "--host", HOST, "--port", str(port)]
    process = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        env=full_env,
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, which stop_server kills if SIGTERM is not enough
    )
    server = Server("uvicorn", process, f"http://{HOST}:{port}", log_path, log_file)
    try:
        wait_until_ready(server.base_url, STARTUP_TIMEOUT_S, server)
        LOG.info("uvicorn ready at %s", server.base_url)
        yield server.base_url
    finally:
        stop_server(server)


@contextlib.contextmanager
def ray_serve_server(env: Mapping[str, str], work_dir: Path) -> Iterator[str]:
    """A local Ray cluster with one replica of deploy.ray_serve; Ray is shut down on exit."""
    import ray
    from ray import serve

    from deploy.ray_serve import TextGenDeployment

    os.environ.update(RAY_ENV)  # read by Ray's own processes, which inherit this environment
    # A short path of our own: Ray's Unix socket paths must fit in 108 bytes.
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    ray.init(
        num_cpus=2,
        object_store_memory=OBJECT_STORE_BYTES,
        include_dashboard=False,
        _temp_dir=temp_dir,
        log_to_driver=False,
    )
    try:
        port = pick_free_port(HOST)
        serve.start(http_options={"host": HOST, "port": port})
        replica_env = {**env, "TEXTGEN_JOB_STORE": f"sqlite:///{work_dir / 'ray-jobs.db'}"}
        options = {"num_replicas": 1, "ray_actor_options": {"num_cpus": 1, "runtime_env": {"env_vars": replica_env}}}
        serve.run(TextGenDeployment.options(**options).bind(), name="textgen", route_prefix="/")
        url = f"http://{HOST}:{port}"
        wait_until_ready(url, STARTUP_TIMEOUT_S)
        LOG.info("Ray Serve ready at %s (Ray logs: %s)", url, temp_dir)
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


# --- requests -----------------------------------------------------------------------------------------


def timed(client: httpx.Client, endpoint: Endpoint) -> float:
    started = time.perf_counter()
    response = client.request(endpoint.method, endpoint.path, json=endpoint.body)
    elapsed = time.perf_counter() - started
    if response.status_code != 200:
        raise RuntimeError(f"{endpoint.label} on {client.base_url}: HTTP {response.status_code} {response.text[:200]}")
    return elapsed


def measure(urls: Mapping[str, str], requests: int, warmup: int, rounds: int) -> list[Latencies]:
    """Per endpoint: warm both servers up, then alternate blocks of sequential requests between them."""
    results: list[Latencies] = []
    clients = {
        name: httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S, trust_env=False) for name, url in urls.items()
    }
    try:
        for endpoint in ENDPOINTS:
            samples: dict[str, list[float]] = {name: [] for name in clients}
            for client in clients.values():
                for _ in range(warmup):
                    timed(client, endpoint)
            for block in range(rounds):
                size = requests // rounds + (1 if block < requests % rounds else 0)
                for name, client in clients.items():
                    samples[name].extend(timed(client, endpoint) for _ in range(size))
            results.extend(Latencies.of(endpoint.label, name, values) for name, values in samples.items())
            LOG.info("%s: done", endpoint.label)
    finally:
        for client in clients.values():
            client.close()
    return results


# --- output -------------------------------------------------------------------------------------------


def overheads(results: Sequence[Latencies]) -> list[dict[str, Any]]:
    """Per endpoint: Ray Serve minus uvicorn, for the median and the p95."""
    by_key = {(row.endpoint, row.server): row for row in results}
    rows = []
    for endpoint in ENDPOINTS:
        plain, ray_row = by_key[(endpoint.label, "uvicorn")], by_key[(endpoint.label, "ray-serve")]
        rows.append(
            {
                "endpoint": endpoint.label,
                "median_overhead_ms": ray_row.median_ms - plain.median_ms,
                "p95_overhead_ms": ray_row.p95_ms - plain.p95_ms,
            }
        )
    return rows


def render_markdown(document: Mapping[str, Any]) -> str:
    meta = document["metadata"]
    machine = meta["machine"]
    lines = [
        "# Ray Serve proxy overhead",
        "",
        f"- date: {meta['date']}",
        f"- model: {meta['model']}; same TEXTGEN_* settings on both servers (torch threads {meta['torch_threads']})",
        f"- machine: {machine.get('cpu_model') or machine.get('processor')}, {machine.get('cpu_count')} CPUs; "
        f"load average {meta['load_average_1m_at_end']} at the end (other work shares the machine)",
        f"- {meta['requests']} sequential requests per endpoint and server on one keep-alive connection, after "
        f"{meta['warmup']} warm-up requests, in {meta['rounds']} alternating blocks",
        "- uvicorn: `uvicorn main:app`, one process; ray-serve: local Ray (2 CPUs), Serve proxy -> 1 replica "
        "of deploy.ray_serve (num_cpus 1)",
        f"- command: `{meta['command']}`",
        "",
        "| endpoint | server | n | median ms | p95 ms | mean ms |",
        "| :--- | :--- | ---: | ---: | ---: | ---: |",
    ]
    for row in document["results"]:
        lines.append(
            f"| {row['endpoint']} | {row['server']} | {row['n']} | {row['median_ms']:.2f} | {row['p95_ms']:.2f} "
            f"| {row['mean_ms']:.2f} |"
        )
    lines += ["", "## Added by the Ray Serve proxy, per request", ""]
    lines += [
        f"- {row['endpoint']}: median +{row['median_overhead_ms']:.2f} ms, p95 +{row['p95_overhead_ms']:.2f} ms"
        for row in document["overhead"]
    ]
    return "\n".join(lines) + "\n"


def write_outputs(out_dir: Path, document: Mapping[str, Any]) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{NAME}.json", out_dir / f"{NAME}.md"
    json_path.write_text(json.dumps(document, indent=2) + "\n")
    md_path.write_text(render_markdown(document))
    return [json_path, md_path]


def build_document(args: argparse.Namespace, model: str, started: datetime, results: list[Latencies]) -> dict[str, Any]:
    metadata = {
        "date": started.isoformat(timespec="seconds"),
        "model": model,
        "torch_threads": args.torch_threads,
        "requests": args.requests,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "machine": machine_info(),
        # Other work on a shared machine shows up here, and in both servers' numbers alike.
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        "command": " ".join(["python -m bench.ray_overhead", *sys.argv[1:]]),
    }
    return {"metadata": metadata, "results": [asdict(row) for row in results], "overhead": overheads(results)}


def run(args: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    started = datetime.now(UTC)
    model = model_setting(args.model, work_dir)
    env = textgen_env(model, args.torch_threads)
    with uvicorn_server(env, work_dir) as plain_url, ray_serve_server(env, work_dir) as ray_url:
        results = measure({"uvicorn": plain_url, "ray-serve": ray_url}, args.requests, args.warmup, args.rounds)
    label = "tiny test GPT-2" if args.model == "tiny" else args.model
    return build_document(args, label, started, results)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ray-overhead-") as work:
        document = run(args, Path(work))
    paths = write_outputs(args.out.resolve(), document)
    sys.stdout.write(render_markdown(document))
    LOG.info("wrote %s", ", ".join(str(path) for path in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
