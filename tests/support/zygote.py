"""A fork server ("zygote") for test servers: import the service once per test process, fork per launch.

Why. A ``uvicorn main:app`` start spends ~9.5 s of CPU importing torch, transformers and what they pull
in, and a test run starts about 33 servers on a 2-core machine. The zygote is one helper process per
pytest process (per xdist worker), started on the first launch: it imports the heavy modules once
(``import main``: imports only, no thread started and no torch op run), then forks a child per launch,
and the child becomes the server exactly as ``python -m uvicorn main:app ...`` would:

* a new session (``setsid``: its pgid is its pid, as ``start_new_session=True`` makes it), cwd as asked,
  stdin /dev/null, stdout and stderr onto the launch's log file (the very descriptor, passed over the
  socket) and ``sys.stdout``/``sys.stderr`` rebuilt on them as the zygote's own were made (the zygote
  runs with the launch's environment, PYTHONUNBUFFERED included, so they are unbuffered as a server's);
* ``os.environ`` replaced by the launch's environment, plus what the import itself set in the zygote's
  (``textgen/__init__.py`` sets GOMP_SPINCOUNT and OMP_WAIT_POLICY unless they are given), so the child's
  environment is what the fresh server's would be after the same import;
* the signal dispositions the zygote had right after the import (those of a fresh interpreter that made
  it); numpy's global generator and torch's default one reseeded from the OS (a fresh process seeds both
  from the OS at import: this torch's ``initial_seed()`` differs per process); Python's ``random``
  reseeds itself after a fork;
* ``runpy.run_module(module, "__main__", alter_sys=True)``: what ``-m`` does, the same ``sys.argv``; it
  ends through ``os._exit`` with the code the interpreter would have exited with, after joining
  non-daemon threads and running the atexit handlers (logging's flush among them), so a server that
  drains at SIGTERM still exits with the code the tests assert (uvicorn re-raises a captured SIGTERM, and
  the child then dies of it, as the fresh process would).

What cannot be equal, and so decides per launch: an environment variable that an imported module read
while being imported is frozen in the zygote. The zygote records every variable read by name during its
import (``os.environ[...]``, ``.get``, ``in``; native libraries such as libgomp read theirs at load time
too), and a launch is forked only if its environment differs from the zygote's in variables named
``TEXTGEN_*`` or ``PYTEST_*`` that the import did not read (the service reads its settings in the
lifespan); any other difference starts a plain subprocess. The hash seed is the zygote's in every child
(str hashes, and so the order of a set of strings, are the same in all servers of one pytest process).

The test process is not the child's parent, so a launch returns a ``ForkedProcess`` (pid, poll, wait,
returncode, send_signal, terminate, kill, as ``subprocess.Popen``): the zygote waits for its children
(one pidfd each) and reports ``pid -> exit code`` over the socket, in subprocess's convention (a negative
signal number for a death by signal: -9 after ``kill -9``).

Lifetime: the zygote exits when the test process's end of the socket closes (the test process ended,
however it ended), and kills its children's process groups with SIGKILL before it exits; if the zygote
dies or cannot start, launches fall back to plain subprocesses with one warning. The protocol is JSON
messages over a ``SOCK_SEQPACKET`` socket pair (one message per datagram, descriptors attached).

``FORK_TEST_SERVERS=0`` turns the zygote off (every launch a plain subprocess), to compare.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import logging
import os
import resource
import runpy
import select
import signal
import socket
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol

logger = logging.getLogger("tests.support.zygote")

OPT_OUT_ENV = "FORK_TEST_SERVERS"
# Variables a launch may set differently from the zygote's environment, as long as no import read them.
PER_LAUNCH_PREFIXES = ("TEXTGEN_", "PYTEST_")
MAX_MESSAGE = 1 << 20  # one message: a launch's environment is a few KiB
START_TIMEOUT_S = 240.0  # the zygote's import, on a busy machine
REPLY_TIMEOUT_S = 60.0  # a fork and the child's set-up
EXIT_TIMEOUT_S = 10.0


class ServerProcess(Protocol):
    """What the tests use of a server process: ``subprocess.Popen`` and ``ForkedProcess`` both are one."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | Any: ...

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...


def forking_enabled(environ: Mapping[str, str] = os.environ) -> bool:
    return environ.get(OPT_OUT_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def _send(sock: socket.socket, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
    data = json.dumps(message).encode()
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.sendall(data)


def _receive(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """One message and the descriptors that came with it; (None, []) when the other end closed."""
    data, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, 4)
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    return json.loads(data), fds


# -- the test process's side ------------------------------------------------------------------------


class ForkedProcess:
    """A child of the zygote, as much of ``subprocess.Popen`` as the tests use."""

    def __init__(self, zygote: ForkServer, pid: int, args: list[str]) -> None:
        self._zygote = zygote
        self.pid = pid
        self.args = args
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._zygote.exit_code(self.pid, timeout=0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            code = self._zygote.exit_code(self.pid, timeout=timeout)
            if code is None:
                raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
            self.returncode = code
        return self.returncode

    def send_signal(self, sig: int) -> None:
        # As Popen: only while it has not been reaped, so a recycled pid is never signalled.
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def __repr__(self) -> str:
        return f"<ForkedProcess pid={self.pid} returncode={self.returncode}>"


class ForkServer:
    """The test process's handle on one zygote: start it, ask for children, learn how they ended."""

    def __init__(self, preload: Sequence[str], env: Mapping[str, str], cwd: Path, log_path: Path) -> None:
        self.env = dict(env)
        self.read_at_import: frozenset[str] = frozenset()
        self._sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._lock = threading.Lock()  # one request on the socket at a time
        self._changed = threading.Condition()  # guards everything below
        self._replies: dict[int, dict[str, Any]] = {}
        self._codes: dict[int, int] = {}
        self._running: set[int] = set()
        self._next_id = 0
        self.alive = False
        with open(log_path, "wb") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", __name__, str(theirs.fileno()), *preload],
                cwd=cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=(theirs.fileno(),),
            )
        theirs.close()  # only the zygote holds its end: its exit closes the socket

    def start(self, timeout_s: float = START_TIMEOUT_S) -> str | None:
        """Wait until the zygote has imported its modules; None when ready, else why it is not."""
        self._sock.settimeout(timeout_s)
        try:
            message, _ = _receive(self._sock)
        except (OSError, ValueError) as error:
            message = {"failed": f"no answer within {timeout_s:.0f} s ({error!r})"}
        self._sock.settimeout(None)
        if message is None or "ready" not in message:
            why = (message or {}).get("failed", "it exited while importing")
            self.close()
            return str(why)
        self.read_at_import = frozenset(message["read"])
        self.alive = True
        threading.Thread(target=self._read_reports, name="fork-server-reports", daemon=True).start()
        return None

    def why_not(self, env: Mapping[str, str]) -> str | None:
        """None when a child can be this launch's server, else which variables stand in the way."""
        differing = {name for name in set(env) | set(self.env) if env.get(name) != self.env.get(name)}
        frozen = sorted(
            name for name in differing if not name.startswith(PER_LAUNCH_PREFIXES) or name in self.read_at_import
        )
        return f"environment differs from the fork server's in {', '.join(frozen)}" if frozen else None

    def spawn(
        self,
        module: str,
        args: Sequence[str],
        env: Mapping[str, str],
        cwd: Path,
        output: int,
        *,
        limits: Mapping[str, tuple[int, int]] | None = None,
    ) -> ForkedProcess:
        """A child running ``python -m module *args`` with this environment and cwd, stdout and stderr on
        ``output`` (a descriptor; the child gets its own copy), ``limits`` set (``resource`` names, as
        ``{"RLIMIT_FSIZE": (soft, hard)}``). OSError when the zygote cannot do it."""
        with self._changed:
            if not self.alive:
                raise OSError("the fork server has exited")
            request_id = self._next_id
            self._next_id += 1
        request = {
            "spawn": request_id,
            "module": module,
            "args": list(args),
            "env": dict(env),
            "cwd": str(cwd),
            "limits": dict(limits or {}),
        }
        with self._lock:
            _send(self._sock, request, [output])
        with self._changed:
            if not self._changed.wait_for(lambda: request_id in self._replies or not self.alive, REPLY_TIMEOUT_S):
                raise OSError(f"the fork server did not answer within {REPLY_TIMEOUT_S:.0f} s")
            reply = self._replies.pop(request_id, None)
            if reply is None:
                raise OSError("the fork server exited while starting a process")
            if "error" in reply:
                raise OSError(reply["error"])
            pid = int(reply["pid"])
            if pid not in self._codes:
                self._running.add(pid)
        return ForkedProcess(self, pid, [sys.executable, "-m", module, *args])

    def exit_code(self, pid: int, timeout: float | None) -> int | None:
        """The child's exit code once the zygote has reaped it; None if it is still running at ``timeout``."""
        with self._changed:
            self._changed.wait_for(lambda: pid in self._codes, timeout)
            return self._codes.get(pid)

    def close(self) -> None:
        """Close our end (the zygote kills its children and exits) and wait for the zygote."""
        with self._changed:
            self.alive = False  # an ending asked for: no warning from the report reader
        # shutdown, not only close: our reader thread is inside recvmsg on this socket, which keeps it open
        # (and the zygote waiting) past a mere close; shutdown ends the connection for both.
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        try:
            self._proc.wait(timeout=EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()

    def _read_reports(self) -> None:
        while True:
            try:
                message, fds = _receive(self._sock)
            except OSError:
                message, fds = None, []
            for fd in fds:
                os.close(fd)
            with self._changed:
                if message is None:
                    self._lost()
                    self._changed.notify_all()
                    return
                if "spawned" in message:
                    self._replies[int(message["spawned"])] = message
                elif "exited" in message:
                    pid = int(message["exited"])
                    self._codes[pid] = int(message["code"])
                    self._running.discard(pid)
                self._changed.notify_all()

    def _lost(self) -> None:
        """The zygote is gone: its children that were still running can no longer be waited for, so they are
        killed (group and all) and reported as killed."""
        if self.alive and self._running:
            logger.warning("The fork server exited; killing the %d server(s) it still ran", len(self._running))
        self.alive = False
        for pid in self._running:
            for kill in (os.killpg, os.kill):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    kill(pid, signal.SIGKILL)
            self._codes[pid] = -signal.SIGKILL
        self._running.clear()


# One zygote per test process, started by the first launch that can use it.
_shared: ForkServer | None = None
_shared_lock = threading.Lock()
_gave_up = False


def shared_fork_server(preload: Sequence[str], env: Mapping[str, str], cwd: Path, log_path: Path) -> ForkServer | None:
    """This process's zygote (started on the first call, with ``env``); None where it is turned off, could
    not start or has exited (a warning says so once; launches then start plain subprocesses)."""
    global _shared, _gave_up
    if not forking_enabled():
        return None
    with _shared_lock:
        if _shared is None and not _gave_up:
            zygote = ForkServer(preload, env, cwd, log_path)
            why = zygote.start()
            if why is None:
                _shared = zygote
                atexit.register(zygote.close)
            else:
                _gave_up = True
                logger.warning("No fork server (%s; its log: %s): servers start as plain subprocesses", why, log_path)
        if _shared is not None and not _shared.alive:
            _shared, _gave_up = None, True
            logger.warning("The fork server has exited: servers start as plain subprocesses from now on")
        return _shared


# -- the zygote's side ------------------------------------------------------------------------------


class _ReadTracking(os._Environ):  # type: ignore[misc,name-defined]
    """``os.environ`` while the preloaded modules are imported: notes every variable read by name."""

    read: ClassVar[set[str]] = set()

    def __getitem__(self, key: str) -> str:
        _ReadTracking.read.add(key)
        return super().__getitem__(key)  # type: ignore[no-any-return]

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            _ReadTracking.read.add(key)
        return super().__contains__(key)  # type: ignore[no-any-return]


def _import_tracking_reads(modules: Sequence[str]) -> set[str]:
    original = type(os.environ)
    os.environ.__class__ = _ReadTracking
    try:
        for module in modules:
            __import__(module)
    finally:
        os.environ.__class__ = original
    return set(_ReadTracking.read)


class _Zygote:
    def __init__(self, sock: socket.socket, import_changes: dict[str, str | None]) -> None:
        self.sock = sock
        self.import_changes = import_changes
        self.signals = _dispositions()
        self.children: dict[int, int] = {}  # pidfd -> pid
        self.poller = select.poll()
        self.poller.register(sock, select.POLLIN)

    def serve(self) -> None:
        try:
            while self._serve_once():
                pass
        finally:
            self._kill_children()

    def _serve_once(self) -> bool:
        for fd, _events in self.poller.poll():
            if fd in self.children:
                self._reap(fd)
                continue
            message, fds = _receive(self.sock)
            if message is None:
                return False  # the test process is gone
            self._spawn(message, fds)
        return True

    def _spawn(self, request: dict[str, Any], fds: list[int]) -> None:
        ready_read, ready_write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(ready_read)
            self._become(request, fds[0], ready_write)  # never returns
        os.close(ready_write)
        for fd in fds:
            os.close(fd)
        with os.fdopen(ready_read, "rb") as ready:
            problem = ready.read().decode(errors="replace")  # "" once the child is set up (or died trying)
        pidfd = os.pidfd_open(pid)
        self.children[pidfd] = pid
        self.poller.register(pidfd, select.POLLIN)
        reply: dict[str, Any] = {"spawned": request["spawn"], "pid": pid}
        if problem:
            reply["error"] = problem
        _send(self.sock, reply)

    def _reap(self, pidfd: int) -> None:
        pid = self.children.pop(pidfd)
        self.poller.unregister(pidfd)
        os.close(pidfd)
        _, status = os.waitpid(pid, 0)
        _send(self.sock, {"exited": pid, "code": os.waitstatus_to_exitcode(status)})

    def _kill_children(self) -> None:
        for pid in self.children.values():
            for kill in (os.killpg, os.kill):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    kill(pid, signal.SIGKILL)
        for pid in self.children.values():
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)

    def _become(self, request: dict[str, Any], output: int, ready: int) -> None:
        """In the child: set up as a fresh ``python -m module`` would be, then run it; never returns."""
        try:
            os.setsid()
            os.chdir(request["cwd"])
            self.sock.close()
            for pidfd in self.children:
                os.close(pidfd)
            _redirect(output)
            _restore_signals(self.signals)
            _replace_environ(request["env"], self.import_changes)
            _reseed()
            for name, values in request["limits"].items():
                resource.setrlimit(getattr(resource, name), tuple(values))
        except BaseException:  # told to the zygote, which tells the test process
            os.write(ready, traceback.format_exc().encode())
            os._exit(127)
        os.close(ready)
        _run_as_main(request["module"], request["args"])


def _dispositions() -> dict[int, Any]:
    found = {}
    for sig in signal.valid_signals():
        with contextlib.suppress(OSError, ValueError):
            handler = signal.getsignal(sig)
            if handler is not None:
                found[sig] = handler
    return found


def _restore_signals(dispositions: dict[int, Any]) -> None:
    for sig, handler in dispositions.items():
        with contextlib.suppress(OSError, ValueError):
            signal.signal(sig, handler)


def _redirect(output: int) -> None:
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(output, 1)
    os.dup2(output, 2)
    for fd in {devnull, output} - {0, 1, 2}:
        os.close(fd)
    # The zygote's streams were made from the same environment as the server's (PYTHONUNBUFFERED,
    # PYTHONIOENCODING): new ones on the same descriptors, the same way, with nothing buffered in them.
    sys.stdout = sys.__stdout__ = _stream_like(sys.__stdout__, 1)
    sys.stderr = sys.__stderr__ = _stream_like(sys.__stderr__, 2)


def _stream_like(old: Any, fd: int) -> io.TextIOWrapper:
    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
    raw = io.FileIO(fd, "w", closefd=False)
    binary: Any = raw if unbuffered else io.BufferedWriter(raw)
    return io.TextIOWrapper(
        binary,
        encoding=getattr(old, "encoding", None),
        errors=getattr(old, "errors", None),
        line_buffering=bool(getattr(old, "line_buffering", False)),
        write_through=unbuffered,
    )


def _replace_environ(env: Mapping[str, str], import_changes: Mapping[str, str | None]) -> None:
    os.environ.clear()
    os.environ.update(env)
    for name, value in import_changes.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def _reseed() -> None:
    """New seeds from the OS for the generators a fresh process seeds from the OS at import (numpy's global
    one; torch's default one, which this torch seeds differently in every process): forked children would
    otherwise all draw the zygote's numbers. Python's ``random`` reseeds itself after a fork."""
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.seed()


def _run_as_main(module: str, args: Sequence[str]) -> None:
    sys.argv = [module, *args]  # run_module puts the module's file first, as -m does
    sys.orig_argv = [sys.executable, "-m", module, *args]
    code = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as ended:
        code = _exit_code(ended.code)
    except KeyboardInterrupt:
        traceback.print_exc()
        _finish_interpreter()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)  # as the interpreter ends on an uncaught KeyboardInterrupt
        code = 128 + signal.SIGINT
    except BaseException:  # reported as the interpreter would: traceback, exit code 1
        traceback.print_exc()
        code = 1
    _finish_interpreter()
    os._exit(code)


def _exit_code(code: object) -> int:
    """What the interpreter exits with for ``SystemExit(code)``."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    with contextlib.suppress(Exception):
        sys.stderr.write(f"{code}\n")
    return 1


def _finish_interpreter() -> None:
    """What the interpreter does before it exits: wait for non-daemon threads, run the atexit handlers
    (logging's flush among them), flush the standard streams."""
    shutdown: Callable[[], None] | None = getattr(threading, "_shutdown", None)
    if shutdown is not None:
        shutdown()
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def zygote_main(argv: Sequence[str]) -> int:
    """``python -m tests.support.zygote FD MODULE...``: import the modules, then serve launches on FD."""
    sock = socket.socket(fileno=int(argv[0]))
    before = dict(os.environ)
    try:
        read = _import_tracking_reads(argv[1:])
    except BaseException:  # told to the test process, which starts plain subprocesses
        _send(sock, {"failed": f"importing {' '.join(argv[1:])} failed:\n{traceback.format_exc()}"})
        return 1
    after = dict(os.environ)
    changes: dict[str, str | None] = {name: after.get(name) for name in set(before) | set(after)}
    changes = {name: value for name, value in changes.items() if before.get(name) != value}
    zygote = _Zygote(sock, changes)  # the dispositions a fresh interpreter has after the same import
    # Ctrl-C reaches the whole foreground group: the test process handles it and closes our socket.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # ends serve(), which kills the children
    _send(sock, {"ready": True, "read": sorted(read)})
    zygote.serve()
    return 0


if __name__ == "__main__":
    sys.exit(zygote_main(sys.argv[1:]))
