"""Real ``uvicorn main:app`` subprocesses for every layer that needs one (e2e, browser, the schemathesis CLI).

``launch_server(env, workers, workdir=...)`` starts a server on a free loopback port, waits for /ready and
always kills its whole process group afterwards. Each server gets the service's own model cache (the GGUF
conversion and weight-format measurement happen once per machine), its own SQLite job store unless told
otherwise, ``HF_HUB_OFFLINE=1`` and a log file; it is started in its own session. A single-worker server is
forked from this test process's fork server (``tests/support/zygote.py``: the service imported once, not
once per server), a plain subprocess otherwise or with ``FORK_TEST_SERVERS=0``.

Every test that starts a server carries ``@pytest.mark.server`` (so ``-m 'not server'`` leaves out every
subprocess); ``launch_server`` fails a test that starts one without it. The root conftest tells this module
which test is being set up (``note_test``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.net import free_port
from tests.support.waiting import wait_until_sync
from tests.support.zygote import ServerProcess, shared_fork_server
from textgen.config import Settings

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
# The cache folder the service itself uses (TEXTGEN_CACHE_DIR, else ~/.cache/textgen): the bundled model's
# conversion and the weight-format measurement are made once per machine (by `make run` or the first test
# server), not once per clone, and every later start reads them (a fresh folder costs the first server
# about a minute).
CACHE_DIR = Path(os.environ.get("TEXTGEN_CACHE_DIR") or Settings.model_fields["cache_dir"].default)
READY_TIMEOUT_S = 240.0
STOP_GRACE_S = 10.0
TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
MODEL_NAME = "SmolLM2-135M-Instruct"


@dataclass
class Server:
    url: str
    proc: ServerProcess  # a subprocess.Popen, or a ForkedProcess (a child of the fork server)
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

    def assert_alive(self) -> None:
        """Fail at once (with the log's tail) if the server has exited: for ``wait_until_sync(still_ok=...)``."""
        assert self.proc.poll() is None, f"the server exited with {self.proc.returncode}:\n{self.log_tail()}"

    def stats(self) -> dict[str, Any]:
        """GET /stats: the engine's batch and the job store's counts right now."""
        return dict(httpx.get(f"{self.url}/stats", timeout=10.0).json())

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


def _ready(server: Server, client: httpx.Client) -> bool:
    """/ready is 200 and every worker has logged its start."""
    with contextlib.suppress(httpx.HTTPError):
        if client.get("/ready").status_code == 200:
            return server.log_text().count("Application startup complete.") >= server.workers
    return False


def _wait_ready(server: Server, timeout_s: float) -> str | None:
    """None once /ready is 200 (and every worker has started), else why not."""

    def alive() -> None:
        code = server.proc.poll()
        if code is not None:
            raise _NotReady(f"the server exited with code {code} before it was ready")

    with httpx.Client(base_url=server.url, timeout=5.0) as client:
        try:
            wait_until_sync(lambda: _ready(server, client), timeout_s, "/ready", interval_s=0.1, still_ok=alive)
        except _NotReady as why:
            return str(why)
        except AssertionError:
            return f"the server was not ready within {timeout_s:.0f} s"
    return None


class _NotReady(Exception):
    pass


# -- which test is starting a server --------------------------------------------------------------------

_current_test: tuple[str, bool] | None = None  # (node id, carries the server marker), set by the root conftest


def note_test(nodeid: str, has_server_marker: bool) -> None:
    """Called by the root conftest before each test's set-up (session fixtures start inside it)."""
    global _current_test
    _current_test = (nodeid, has_server_marker)


def require_server_marker() -> None:
    """Fail the test being set up or run if it starts a real server without ``@pytest.mark.server``."""
    if _current_test is not None and not _current_test[1]:
        pytest.fail(
            f"{_current_test[0]} starts a real server process but does not carry @pytest.mark.server; "
            "add it to the test or to the module's pytestmark"
        )


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
    require_server_marker()
    job_store = job_store or workdir / "jobs.db"
    for attempt in range(3):  # a free port can be taken between probing and binding it
        port = free_port()
        log_path = workdir / f"{name}-{port}.log"
        log_file = open(log_path, "wb")  # noqa: SIM115 - closed by Server.close()
        args = ["main:app", "--host", "127.0.0.1", "--port", str(port)]
        if workers > 1:
            args += ["--workers", str(workers)]
        cmd = [sys.executable, "-m", "uvicorn", *args]
        launch_env = server_env(job_store, env or {})
        proc = start_uvicorn(args, launch_env, log_file.fileno(), workers=workers, workdir=workdir)
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


def start_uvicorn(
    args: list[str], env: dict[str, str], output: int, *, workers: int, workdir: Path, max_file_bytes: int | None = None
) -> ServerProcess:
    """``python -m uvicorn *args`` from the repo root in its own session, stdin /dev/null, stdout and stderr
    on the descriptor ``output`` (``max_file_bytes``: its RLIMIT_FSIZE): a child of the fork server where it
    can be the same process as a fresh one, else a plain subprocess. ``workdir`` gets the fork server's log
    when this launch starts it."""
    limits = {} if max_file_bytes is None else {"RLIMIT_FSIZE": (max_file_bytes, max_file_bytes)}
    # --workers N: uvicorn spawns a fresh interpreter per worker (multiprocessing's spawn), which imports
    # everything again whatever the parent imported, so forking the parent would save nothing.
    if workers == 1:
        zygote_env = server_env(workdir / "jobs.db", {})
        zygote = shared_fork_server(["main"], zygote_env, REPO_ROOT, workdir / "fork-server.log")
        why = "the fork server is off or has exited" if zygote is None else zygote.why_not(env)
        if zygote is not None and why is None:
            try:
                return zygote.spawn("uvicorn", args, env, REPO_ROOT, output, limits=limits)
            except OSError as error:
                logger.warning("The fork server could not start a server (%s): starting a plain subprocess", error)
        else:
            logger.info("Starting a plain subprocess: %s", why)

    def set_limits() -> None:
        for name, values in limits.items():
            resource.setrlimit(getattr(resource, name), values)

    return subprocess.Popen(
        [sys.executable, "-m", "uvicorn", *args],
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=output,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=set_limits if limits else None,  # only setrlimit between fork and exec
    )


def enter_together(
    stack: contextlib.ExitStack, launchers: list[contextlib.AbstractContextManager[Server]]
) -> list[Server]:
    """Enter several ``launch_server`` contexts at once (their imports and model loads overlap, so several
    servers cost about one start) and register their exits on ``stack``; the first failure is raised once
    every start has ended (the servers that did start are stopped with the stack)."""
    with ThreadPoolExecutor(max_workers=len(launchers), thread_name_prefix="server-start") as pool:
        starting = [pool.submit(launcher.__enter__) for launcher in launchers]
    servers: list[Server] = []
    failures: list[BaseException] = []
    for launcher, started in zip(launchers, starting, strict=True):
        try:
            servers.append(started.result())
            stack.push(launcher.__exit__)
        except BaseException as failure:
            failures.append(failure)
    if failures:
        raise failures[0]
    return servers


# -- servers shared by every test that asks for the same settings ------------------------------------

# default_server's settings: one background job at a time, so a second job submitted while the first runs
# is observably ``queued``; nothing else differs from a plain ``uvicorn main:app``.
DEFAULT_ENV: dict[str, str] = {"TEXTGEN_JOB_CONCURRENCY": "1"}


class SharedServers:
    """Real servers kept for as long as this object is open (the session), one per set of settings.

    A server start costs seconds of imports and model loading (more on a busy machine), so a module whose
    tests only need a server with given settings, and leave it fit for the next test (no kill, no
    exhausted quota, no setting changed), asks here instead of starting its own: ``get(env)`` starts the
    server the first time those settings are asked for and returns the same one afterwards. Keys are the
    exact ``env`` and ``workers``, so a test that needs any other setting gets a server of its own. A
    server that has exited (a test killed it) is replaced by a fresh one. Every ``get`` checks the asking
    test's server marker, as ``launch_server`` does.
    """

    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        self._tmp = tmp_path_factory
        self._servers: dict[tuple[tuple[tuple[str, str], ...], int], Server] = {}
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> SharedServers:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stack.close()

    def get(
        self,
        env: dict[str, str] | None = None,
        workers: int = 1,
        *,
        name: str = "shared",
        ready_timeout_s: float = READY_TIMEOUT_S,
    ) -> Server:
        require_server_marker()
        key = (tuple(sorted((env or {}).items())), workers)
        server = self._servers.get(key)
        if server is None or server.proc.poll() is not None:
            workdir = self._tmp.mktemp(f"shared-{name}")
            launcher = launch_server(env, workers, workdir=workdir, name=name, ready_timeout_s=ready_timeout_s)
            server = self._stack.enter_context(launcher)
            self._servers[key] = server
        return server


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

    def all_terminal() -> bool:
        nonlocal pending
        for job_id in pending:
            jobs[job_id] = get_job(client, job_id)
        pending = [job_id for job_id in pending if jobs[job_id]["state"] not in TERMINAL_STATES]
        return not pending

    try:
        wait_until_sync(all_terminal, timeout_s, "every job ending", interval_s=interval_s)
    except AssertionError:
        states = {job_id: jobs[job_id]["state"] for job_id in jobs}
        pytest.fail(f"jobs not terminal within {timeout_s:.0f} s: {states}")
    return jobs


def states_on_disk(job_store: Path) -> dict[str, tuple[str, int]]:
    """What a (dead) server left in the store, read straight from the file: job id -> (state, attempts)."""
    conn = sqlite3.connect(job_store)
    try:
        rows = conn.execute("SELECT id, state, attempts FROM jobs").fetchall()
    finally:
        conn.close()
    return {job_id: (state, attempts) for job_id, state, attempts in rows}
