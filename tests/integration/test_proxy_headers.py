"""Who the caller is behind a real uvicorn, started exactly the way operators start it.

uvicorn wraps every app in its ``ProxyHeadersMiddleware``, which rewrites the client address from
X-Forwarded-For for the peers in ``--forwarded-allow-ips`` (loopback by default) before the app sees
it. The app takes that decision back at start-up (``textgen.api.security``): the client is the socket
peer unless that peer is one of TEXTGEN_TRUSTED_PROXIES, whatever uvicorn was told. So a caller on
loopback cannot pick its own rate-limit or failed-key bucket under plain ``uvicorn main:app``, one
worker or several, while a proxy the operator listed in TEXTGEN_TRUSTED_PROXIES is believed.

Each test starts a real uvicorn subprocess on the tiny GPT-2 (a few seconds each: marked ``server``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support.net import free_port
from tests.support.server import require_server_marker
from tests.support.waiting import wait_until_sync

ROOT = Path(__file__).resolve().parents[2]
BODY = {"prompt": "The future of AI is", "max_new_tokens": 1}
KEY = "right-key-0123456789abcdef"
PLAIN = "uvicorn main:app --port $PORT"  # what main.py's docstring and the README say, on a free port


def procfile_command() -> str:
    line = (ROOT / "Procfile").read_text(encoding="utf-8").strip()
    assert line.startswith("web: ")
    return line.removeprefix("web: ")


def makefile_run_command() -> str:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    return makefile.split("\nrun:", 1)[1].split("\n\n", 1)[0]


def test_the_procfile_and_make_run_start_plain_uvicorn() -> None:
    """Nothing to keep in step with TEXTGEN_TRUSTED_PROXIES: the app decides, whatever uvicorn was told."""
    assert procfile_command() == "uvicorn main:app --host 0.0.0.0 --port ${PORT:-8000}"
    assert "$(VENV)/bin/uvicorn main:app --host $(HOST) --port $(PORT)\n" in makefile_run_command() + "\n"
    assert "forwarded-allow-ips" not in procfile_command() + makefile_run_command()


@dataclass
class Served:
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def uvicorn_server(
    tmp_path: Path, tiny_model_dir: Path, command: str, *, workers: int = 1, **settings: str
) -> Iterator[Served]:
    """``command`` (a shell line that reads $PORT) from the repo root, with no FORWARDED_ALLOW_IPS and no
    TEXTGEN_ settings but ``settings``; waits until every worker is ready, kills the group afterwards."""
    require_server_marker()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEXTGEN_") and k != "FORWARDED_ALLOW_IPS"}
    env.update(
        PORT=str(port),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        TEXTGEN_MODEL=str(tiny_model_dir),
        TEXTGEN_DTYPE="float32",
        TEXTGEN_JOB_STORE=f"sqlite:///{tmp_path / 'jobs.db'}",
        TEXTGEN_CACHE_DIR=str(tmp_path / "cache"),
        TEXTGEN_WARMUP="false",
        HF_HUB_OFFLINE="1",
        **settings,
    )
    served = Served(f"http://127.0.0.1:{port}", tmp_path / f"server-{port}.log")
    log = served.log_path.open("wb")
    # A plain subprocess, never the fork server (tests/support/zygote.py): what is under test is this command
    # line itself (the Procfile's, through a shell), with an environment the fork server was not made with.
    proc = subprocess.Popen(
        ["bash", "-c", "exec " + command], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        def alive() -> None:
            assert proc.poll() is None, served.log()

        def ready() -> bool:
            try:
                up = httpx.get(f"{served.url}/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False
            return up and served.log().count("Application startup complete.") >= workers

        wait_until_sync(ready, 120, f"{command} ready", interval_s=0.2, still_ok=alive)
        yield served
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def rotated(count: int, prefix: str = "203.0.113.") -> list[str]:
    return [f"{prefix}{i + 1}" for i in range(count)]


def generate_statuses(url: str, forwarded: list[str]) -> list[int]:
    with httpx.Client(base_url=url, timeout=60) as client:
        return [client.post("/generate", json=BODY, headers={"X-Forwarded-For": ip}).status_code for ip in forwarded]


def assert_limited_to_one_bucket(statuses: list[int], rpm: int) -> None:
    """One caller under ``rpm``: fixed one-minute windows, so a run that crosses a minute boundary may
    get a second window's worth (the requests here take seconds, so never a third)."""
    assert set(statuses) <= {200, 429}, statuses
    assert statuses[0] == 200 and statuses.count(200) <= 2 * rpm, statuses


@pytest.mark.server
def test_plain_uvicorn_does_not_let_a_loopback_caller_pick_its_rate_limit_bucket(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    with uvicorn_server(tmp_path, tiny_model_dir, PLAIN, TEXTGEN_RATE_LIMIT_RPM="5") as served:
        statuses = generate_statuses(served.url, rotated(20))
        log = served.log()
    assert_limited_to_one_bucket(statuses, rpm=5)  # before the fix: 20/20 passed
    assert "X-Forwarded-For is believed from nobody" in log, log


@pytest.mark.server
def test_plain_uvicorn_throttles_wrong_key_guesses_from_rotated_addresses(tmp_path: Path, tiny_model_dir: Path) -> None:
    settings = {"TEXTGEN_API_KEYS": KEY, "TEXTGEN_AUTH_FAILURES_PER_MINUTE": "5"}
    with (
        uvicorn_server(tmp_path, tiny_model_dir, PLAIN, **settings) as served,
        httpx.Client(base_url=served.url, timeout=60) as client,
    ):
        guesses = [
            client.get("/jobs", headers={"Authorization": f"Bearer guess-{i}", "X-Forwarded-For": ip}).status_code
            for i, ip in enumerate(rotated(20))
        ]
        # Someone else behind the same address (a NAT, the same proxy) with the right key is not locked out.
        valid = client.get("/jobs", headers={"Authorization": f"Bearer {KEY}", "X-Forwarded-For": "203.0.113.99"})
        log = served.log()
    assert guesses == [401] * 5 + [429] * 15  # before the fix: 20 x 401, never throttled
    assert valid.status_code == 200
    assert log.count("Locking out missing or invalid API keys from 127.0.0.1") == 1, log
    assert "guess-" not in log and KEY not in log


@pytest.mark.server
def test_two_workers_do_not_believe_x_forwarded_for_either(tmp_path: Path, tiny_model_dir: Path) -> None:
    command = PLAIN + " --workers 2"
    with uvicorn_server(tmp_path, tiny_model_dir, command, workers=2, TEXTGEN_RATE_LIMIT_RPM="5") as served:
        statuses = generate_statuses(served.url, rotated(20))
    assert_limited_to_one_bucket(statuses, rpm=5)  # the limiter lives in the shared SQLite file


@pytest.mark.server
def test_uvicorn_told_to_trust_a_proxy_the_service_does_not_is_overruled_with_a_warning(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    command = PLAIN + " --proxy-headers --forwarded-allow-ips '*'"
    with uvicorn_server(tmp_path, tiny_model_dir, command, TEXTGEN_RATE_LIMIT_RPM="5") as served:
        statuses = generate_statuses(served.url, rotated(20))
        log = served.log()
    assert_limited_to_one_bucket(statuses, rpm=5)
    assert "set TEXTGEN_TRUSTED_PROXIES" in log, log


@pytest.mark.server
def test_a_proxy_the_operator_configured_is_believed(tmp_path: Path, tiny_model_dir: Path) -> None:
    command = PLAIN + " --proxy-headers --forwarded-allow-ips 127.0.0.1"
    settings = {"TEXTGEN_RATE_LIMIT_RPM": "5", "TEXTGEN_TRUSTED_PROXIES": "127.0.0.1"}
    with uvicorn_server(tmp_path, tiny_model_dir, command, **settings) as served:
        distinct = generate_statuses(served.url, rotated(12))
        same = generate_statuses(served.url, ["198.51.100.9"] * 12)
        log = served.log()
    assert distinct == [200] * 12  # twelve callers, one request each
    assert_limited_to_one_bucket(same, rpm=5)  # one caller behind the proxy
    assert "set TEXTGEN_TRUSTED_PROXIES" not in log, log


@pytest.mark.server
def test_the_procfile_command_believes_only_the_configured_proxies(tmp_path: Path, tiny_model_dir: Path) -> None:
    with uvicorn_server(tmp_path, tiny_model_dir, procfile_command(), TEXTGEN_RATE_LIMIT_RPM="5") as served:
        statuses = generate_statuses(served.url, rotated(12))
    assert_limited_to_one_bucket(statuses, rpm=5)
