"""End-to-end fixtures: a real ``uvicorn main:app`` subprocess on a free loopback port.

``start_server(env, workers=1)`` (function-scoped fixture) starts a server and stops it after the test;
``launch_server`` is the same as a context manager for module- and session-scoped servers;
``default_server`` is one session-wide server (``TEXTGEN_JOB_CONCURRENCY=1``) shared by the tests whose
settings allow it. Each server gets the shared model cache (the GGUF conversion happens once per
machine), its own SQLite job store, ``HF_HUB_OFFLINE=1`` and a log file; it is started in its own
session and its whole process group is killed at teardown.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.net import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE_DIR = REPO_ROOT / ".cache" / "textgen"
READY_TIMEOUT_S = 240.0
STOP_GRACE_S = 10.0
TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
MODEL_NAME = "SmolLM2-135M-Instruct"


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    job_store: Path
    workers: int = 1
    _log_file: Any = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_text()[-chars:] if self.log_path.exists() else "<no log>"

    def client(self, timeout: float = 120.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    def kill9(self) -> int:
        """SIGKILL the uvicorn process itself, reap it (so its pid is really gone), then any leftovers."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        code = self.proc.wait(timeout=30)
        self._kill_group(signal.SIGKILL)
        return code

    def terminate(self, grace_s: float = STOP_GRACE_S) -> int:
        """SIGTERM the process group (graceful shutdown), SIGKILL it if it outlives ``grace_s``."""
        if self.proc.poll() is None:
            self._kill_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self._kill_group(signal.SIGKILL)
                self.proc.wait(timeout=30)
        self._kill_group(signal.SIGKILL)  # workers or helpers that outlived the main process
        return int(self.proc.returncode)

    def close(self) -> None:
        try:
            self.terminate()
        finally:
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None

    def _kill_group(self, sig: signal.Signals) -> None:
        # start_new_session=True made the server a group leader: its pgid is its pid.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)


def server_env(job_store: Path, env: dict[str, str]) -> dict[str, str]:
    return {
        **os.environ,
        "TEXTGEN_CACHE_DIR": str(CACHE_DIR),
        "TEXTGEN_JOB_STORE": f"sqlite:///{job_store}",  # job_store is absolute: sqlite:////abs/path
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        **env,
    }


def _wait_ready(server: Server, timeout_s: float) -> str | None:
    """None once /ready is 200 (and every worker has started), else why not."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=server.url, timeout=5.0) as client:
        while time.monotonic() < deadline:
            code = server.proc.poll()
            if code is not None:
                return f"the server exited with code {code} before it was ready"
            with contextlib.suppress(httpx.HTTPError):
                if client.get("/ready").status_code == 200:
                    started = server.log_text().count("Application startup complete.")
                    if started >= server.workers:
                        return None
            time.sleep(0.25)
    return f"the server was not ready within {timeout_s:.0f} s"


@contextmanager
def launch_server(
    env: dict[str, str] | None = None,
    workers: int = 1,
    *,
    workdir: Path,
    job_store: Path | None = None,
    name: str = "server",
    ready_timeout_s: float = READY_TIMEOUT_S,
) -> Iterator[Server]:
    """Start ``uvicorn main:app`` from the repo root, wait for /ready, and always kill it afterwards."""
    job_store = job_store or workdir / "jobs.db"
    for attempt in range(3):  # a free port can be taken between probing and binding it
        port = free_port()
        log_path = workdir / f"{name}-{port}.log"
        log_file = open(log_path, "wb")  # noqa: SIM115 - closed by Server.close()
        cmd = [sys.executable, "-m", "uvicorn", "main:app", "--host", "127.0.0.1", "--port", str(port)]
        if workers > 1:
            cmd += ["--workers", str(workers)]
        proc = subprocess.Popen(
            cmd,
            cwd=REPO_ROOT,
            env=server_env(job_store, env or {}),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        server = Server(f"http://127.0.0.1:{port}", proc, log_path, job_store, workers, log_file)
        try:
            problem = _wait_ready(server, ready_timeout_s)
        except BaseException:
            server.close()
            raise
        if problem is not None:
            server.close()
            if "address already in use" in server.log_text().lower() and attempt < 2:
                continue
            pytest.fail(f"{problem} ({' '.join(cmd)}); log tail of {log_path}:\n{server.log_tail()}")
        try:
            yield server
        finally:
            server.close()
        return


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """``start_server(env, workers=1, job_store=None) -> Server``; all servers of a test share
    ``tmp_path/jobs.db`` unless told otherwise, and all are killed at teardown."""
    with contextlib.ExitStack() as stack:
        counter = iter(range(1_000))

        def start(env: dict[str, str] | None = None, workers: int = 1, *, job_store: Path | None = None) -> Server:
            return stack.enter_context(
                launch_server(env, workers, workdir=tmp_path, job_store=job_store, name=f"server{next(counter)}")
            )

        yield start


@pytest.fixture(scope="session")
def default_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for the tests that need no special settings; one job at a time, so a second job
    submitted while the first runs is observably ``queued``."""
    with launch_server({"TEXTGEN_JOB_CONCURRENCY": "1"}, workdir=tmp_path_factory.mktemp("default-server")) as server:
        yield server


@pytest.fixture
def client(default_server: Server) -> Iterator[httpx.Client]:
    with default_server.client() as http:
        yield http


# -- helpers shared by the test modules -----------------------------------------------------------


def submit_job(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/generate_background", json=body)
    assert response.status_code == 202, response.text
    return dict(response.json())


def get_job(client: httpx.Client, job_id: str) -> dict[str, Any]:
    response = client.get(f"/jobs/{job_id}")
    assert response.status_code == 200, response.text
    return dict(response.json())


def wait_until_terminal(
    client: httpx.Client, job_ids: Iterable[str], timeout_s: float, interval_s: float = 0.2
) -> dict[str, dict[str, Any]]:
    """Poll until every job is succeeded/failed/cancelled; fail with their states on timeout."""
    pending = list(job_ids)
    jobs: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    while True:
        for job_id in pending:
            jobs[job_id] = get_job(client, job_id)
        pending = [job_id for job_id in pending if jobs[job_id]["state"] not in TERMINAL_STATES]
        if not pending:
            return jobs
        if time.monotonic() > deadline:
            states = {job_id: jobs[job_id]["state"] for job_id in jobs}
            pytest.fail(f"jobs not terminal within {timeout_s:.0f} s: {states}")
        time.sleep(interval_s)


def states_on_disk(job_store: Path) -> dict[str, tuple[str, int]]:
    """What a (dead) server left in the store, read straight from the file: job id -> (state, attempts)."""
    conn = sqlite3.connect(job_store)
    try:
        rows = conn.execute("SELECT id, state, attempts FROM jobs").fetchall()
    finally:
        conn.close()
    return {job_id: (state, attempts) for job_id, state, attempts in rows}
