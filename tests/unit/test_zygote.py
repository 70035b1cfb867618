"""The fork server for test servers (``tests/support/zygote.py``), on a trivial target: each child is the
module run as ``python -m`` would run it (argv, cwd, session, environment, stdin, output, signal
dispositions, fresh random seeds), reports its exit code as ``subprocess`` does, and nothing outlives a
test process that dies, nor a zygote that dies. The real server launched through it: every e2e module."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import zygote as zygote_module
from tests.support.waiting import wait_until_sync
from tests.support.zygote import OPT_OUT_ENV, ForkedProcess, ForkServer, shared_fork_server

REPO_ROOT = Path(__file__).resolve().parents[2]
PROBE = "tests.support.zygote_probe"
PRELOAD = ["numpy", "tests.support.zygote_preloaded"]
BASE_ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "PROBE": "zygote"}


@pytest.fixture
def zygote(tmp_path: Path) -> Iterator[ForkServer]:
    fork_server = ForkServer(PRELOAD, BASE_ENV, REPO_ROOT, tmp_path / "zygote.log")
    assert fork_server.start() is None, (tmp_path / "zygote.log").read_text()
    yield fork_server
    fork_server.close()


def spawn(zygote: ForkServer, log: Path, *args: str, cwd: Path = REPO_ROOT, **env: str) -> ForkedProcess:
    with open(log, "wb") as output:
        return zygote.spawn(PROBE, args, {**BASE_ENV, **env}, cwd, output.fileno())


def described(log: Path) -> dict[str, Any]:
    return dict(json.loads(log.read_text().splitlines()[0]))


def logged_line(log: Path) -> bool:
    return log.exists() and log.read_text().count("\n") >= 1


def gone(pid: int) -> bool:
    """The process has ended (a zombie whose new parent has not reaped it yet counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def test_a_child_is_the_module_run_as_main(zygote: ForkServer, tmp_path: Path) -> None:
    log = tmp_path / "child.log"
    child = spawn(zygote, log, "exit", "3", cwd=tmp_path, PROBE="child")
    assert child.wait(timeout=30) == 3
    seen = described(log)
    assert seen["argv"] == [str(REPO_ROOT / "tests/support/zygote_probe.py"), "exit", "3"]
    assert seen["cwd"] == str(tmp_path)
    assert seen["pid"] == child.pid and seen["sid"] == child.pid  # its own session: killpg(pid) reaches it all
    assert seen["probe"] == "child"  # the launch's environment, not the zygote's
    assert seen["stdin"] == "/dev/null"
    # A fresh interpreter's dispositions, not the zygote's own (it ignores SIGINT, handles SIGTERM). What a
    # fresh one has depends on how this run was started (a background job or nohup starts with SIGINT
    # ignored, and Python keeps it so), so it is asked, not assumed.
    assert (seen["sigint"], seen["sigterm"]) == fresh_interpreter_dispositions()


def fresh_interpreter_dispositions() -> tuple[str, str]:
    probe = "import signal; print(repr(signal.getsignal(signal.SIGINT))); print(repr(signal.getsignal(signal.SIGTERM)))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    sigint, sigterm = done.stdout.splitlines()
    return sigint, sigterm


def test_exit_codes_are_subprocess_codes(zygote: ForkServer, tmp_path: Path) -> None:
    failing = spawn(zygote, tmp_path / "raise.log", "raise")
    assert failing.wait(timeout=30) == 1
    assert "RuntimeError: the probe failed on purpose" in (tmp_path / "raise.log").read_text()

    for sig in (signal.SIGKILL, signal.SIGTERM):
        log = tmp_path / f"wait-{sig.name}.log"
        waiting = spawn(zygote, log, "wait")
        wait_until_sync(lambda log=log: logged_line(log), 30, "the probe's first line")  # type: ignore[misc]
        assert waiting.poll() is None and waiting.returncode is None
        with pytest.raises(subprocess.TimeoutExpired):
            waiting.wait(timeout=0.05)
        waiting.send_signal(sig)
        assert waiting.wait(timeout=30) == -sig
        assert waiting.poll() == -sig


def test_every_child_draws_its_own_random_numbers(zygote: ForkServer, tmp_path: Path) -> None:
    draws = []
    for n in range(2):
        log = tmp_path / f"draw{n}.log"
        assert spawn(zygote, log, "exit", "0").wait(timeout=30) == 0
        draws.append(described(log)["numpy"])
    assert None not in draws and draws[0] != draws[1]  # not the generator state the zygote had at the fork


def test_a_launch_forks_only_where_the_import_could_not_have_seen_the_difference(zygote: ForkServer) -> None:
    assert "TEXTGEN_PROBE_AT_IMPORT" in zygote.read_at_import
    assert zygote.why_not(BASE_ENV) is None
    assert zygote.why_not({**BASE_ENV, "TEXTGEN_JOB_CONCURRENCY": "4", "PYTEST_CURRENT_TEST": "x"}) is None
    read_at_import = zygote.why_not({**BASE_ENV, "TEXTGEN_PROBE_AT_IMPORT": "x"})
    assert read_at_import is not None and "TEXTGEN_PROBE_AT_IMPORT" in read_at_import
    other = zygote.why_not({**BASE_ENV, "OMP_NUM_THREADS": "1"})  # native libraries read such at load time
    assert other is not None and "OMP_NUM_THREADS" in other


def test_children_die_with_the_zygote(zygote: ForkServer, tmp_path: Path) -> None:
    log = tmp_path / "orphan.log"
    child = spawn(zygote, log, "wait")
    wait_until_sync(lambda: logged_line(log), 30, "the probe's first line")
    os.kill(zygote._proc.pid, signal.SIGKILL)
    assert child.wait(timeout=30) == -signal.SIGKILL  # no zygote left to report it: killed and said so
    wait_until_sync(lambda: gone(child.pid), 30, "the orphaned child ending")
    with pytest.raises(OSError, match="exited"):
        spawn(zygote, tmp_path / "late.log", "exit", "0")


DRIVER = """
import json, os, sys, threading
from pathlib import Path
from tests.support.zygote import ForkServer
log, zlog = Path(sys.argv[1]), Path(sys.argv[2])
env = {**os.environ, "PYTHONUNBUFFERED": "1"}
zygote = ForkServer(["tests.support.zygote_preloaded"], env, Path.cwd(), zlog)
assert zygote.start() is None
with open(log, "wb") as output:
    child = zygote.spawn("tests.support.zygote_probe", ["group"], env, Path.cwd(), output.fileno())
sys.stdout.write(json.dumps({"zygote": zygote._proc.pid, "child": child.pid}) + "\\n")
sys.stdout.flush()
threading.Event().wait()
"""


def test_nothing_outlives_a_killed_test_process(tmp_path: Path) -> None:
    """A test process killed with SIGKILL (no teardown runs) leaves no zygote, server or server's child."""
    log = tmp_path / "group.log"
    driver = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(DRIVER), str(log), str(tmp_path / "zygote.log")],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
    )
    try:
        assert driver.stdout is not None
        pids = json.loads(driver.stdout.readline())
        wait_until_sync(lambda: log.read_text().count("\n") >= 2, 30, "the probe's grandchild")
        grandchild = json.loads(log.read_text().splitlines()[1])["grandchild"]
        alive = [pids["zygote"], pids["child"], grandchild]
        assert not any(gone(pid) for pid in alive)
    finally:
        driver.kill()
        driver.wait()
    wait_until_sync(lambda: all(gone(pid) for pid in alive), 30, "the zygote and its processes ending")


def test_a_zygote_that_cannot_start_falls_back_with_one_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(zygote_module, "_shared", None)
    monkeypatch.setattr(zygote_module, "_gave_up", False)
    caplog.set_level(logging.WARNING, logger=zygote_module.logger.name)
    for _ in range(2):
        assert shared_fork_server(["tests.support.no_such_module"], BASE_ENV, REPO_ROOT, tmp_path / "z.log") is None
    assert [record.levelno for record in caplog.records] == [logging.WARNING]
    assert "No module named 'tests.support.no_such_module'" in caplog.records[0].getMessage()


def test_the_opt_out_starts_no_zygote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(zygote_module, "_shared", None)
    monkeypatch.setattr(zygote_module, "_gave_up", False)
    monkeypatch.setenv(OPT_OUT_ENV, "0")
    assert shared_fork_server(PRELOAD, BASE_ENV, REPO_ROOT, tmp_path / "z.log") is None
    assert not (tmp_path / "z.log").exists()
