"""Who the caller is behind a real uvicorn started the way the Procfile and ``make run`` start it.

uvicorn rewrites the client address from X-Forwarded-For for the peers it trusts (loopback, by
default) before the app sees it; the Procfile and the Makefile pass ``--forwarded-allow-ips`` from
``python -m textgen.access`` (TEXTGEN_TRUSTED_PROXIES), so a loopback caller cannot pick its own
rate-limit bucket unless it is a configured proxy.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.net import free_port

ROOT = Path(__file__).resolve().parents[2]
BODY = {"prompt": "The future of AI is", "max_new_tokens": 1}


def procfile_command() -> str:
    line = (ROOT / "Procfile").read_text(encoding="utf-8").strip()
    assert line.startswith("web: ")
    return line.removeprefix("web: ")


def test_the_procfile_and_make_run_pass_the_trusted_proxies_to_uvicorn() -> None:
    assert '--forwarded-allow-ips "$(python -m textgen.access)"' in procfile_command()
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    run_recipe = makefile.split("\nrun:", 1)[1].split("\n\n", 1)[0]
    assert '--forwarded-allow-ips "$$($(PY) -m textgen.access)"' in run_recipe


def test_textgen_access_prints_uvicorns_forwarded_allow_ips(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEXTGEN_")}

    def printed(extra: dict[str, str]) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "textgen.access"],
            cwd=tmp_path,
            env={**env, "PYTHONPATH": str(ROOT), **extra},
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout.strip()

    assert printed({}) == ""  # nobody: the socket peer is the client
    assert printed({"TEXTGEN_TRUSTED_PROXIES": "10.0.0.5, 10.1.0.0/16"}) == "10.0.0.5/32,10.1.0.0/16"
    (tmp_path / ".env").write_text("TEXTGEN_TRUSTED_PROXIES=192.0.2.1\n", encoding="utf-8")
    assert printed({}) == "192.0.2.1/32"


@contextmanager
def procfile_server(tmp_path: Path, tiny_model_dir: Path, **settings: str) -> Iterator[str]:
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
    # The Procfile binds 0.0.0.0; the test only talks to it over loopback.
    log = (tmp_path / "server.log").open("wb")
    proc = subprocess.Popen(
        ["bash", "-c", "exec " + procfile_command()], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            time.sleep(0.2)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _statuses(url: str, forwarded: list[str]) -> list[int]:
    with httpx.Client(base_url=url, timeout=60) as client:
        return [client.post("/generate", json=BODY, headers={"X-Forwarded-For": ip}).status_code for ip in forwarded]


def test_rpm_holds_against_x_forwarded_for_behind_the_procfile_uvicorn(tmp_path: Path, tiny_model_dir: Path) -> None:
    with procfile_server(tmp_path, tiny_model_dir, TEXTGEN_RATE_LIMIT_RPM="2") as url:
        assert _statuses(url, ["203.0.113.1", "203.0.113.2", "203.0.113.3"]) == [200, 200, 429]
    log = (tmp_path / "server.log").read_text()
    assert not re.search(r"uvicorn believes X-Forwarded-For", log), log


def test_a_trusted_proxy_is_believed_behind_the_procfile_uvicorn(tmp_path: Path, tiny_model_dir: Path) -> None:
    settings = {"TEXTGEN_RATE_LIMIT_RPM": "2", "TEXTGEN_TRUSTED_PROXIES": "127.0.0.1"}
    with procfile_server(tmp_path, tiny_model_dir, **settings) as url:
        assert _statuses(url, ["203.0.113.1", "203.0.113.2", "203.0.113.3"]) == [200, 200, 200]
        assert _statuses(url, ["198.51.100.9"] * 3) == [200, 200, 429]
