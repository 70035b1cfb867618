"""A real redis-server on a free loopback port, for tests: started, waited for, and stopped.

No mocks: the Redis job store is tested against the server it will run against. ``redis-server``
comes from the README's set-up (``make setup`` installs Debian's package when it is missing).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.support.net import free_port
from tests.support.waiting import wait_until_sync

_START_TIMEOUT_S = 15.0


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def kill9(self) -> None:
        """SIGKILL, as a crash would: nothing is flushed or saved on the way out."""
        self.process.kill()
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def _aof_ready(port: int) -> bool:
    """The first AOF rewrite of a fresh server has finished (until then, a SIGKILL can lose writes that
    went to an increment file not yet named in the AOF manifest)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"INFO persistence\r\n")
            reply = b""
            while b"aof_rewrite_scheduled" not in reply:
                chunk = sock.recv(65536)
                if not chunk:
                    return False
                reply += chunk
            return b"aof_rewrite_in_progress:0" in reply and b"aof_rewrite_scheduled:0" in reply
    except OSError:
        return False


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def start_redis(workdir: Path, *, appendonly: bool = True, port: int | None = None) -> RedisServer:
    """Start redis-server on a free loopback port with its append-only file on (``appendfsync everysec``,
    as the service requires unless TEXTGEN_REDIS_ALLOW_VOLATILE); RuntimeError saying how to fix it."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError(
            "redis-server is not installed: run `make setup` as root (it installs Debian's redis-server) "
            "or `sudo apt-get install redis-server`."
        )
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port() if port is None else port
    log_path = workdir / "redis.log"
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    args += ["--appendonly", "yes" if appendonly else "no", "--appendfsync", "everysec"]
    args += ["--dir", str(workdir), "--logfile", str(log_path), "--daemonize", "no"]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    server = RedisServer(port, process, log_path)

    def still_running() -> None:
        if process.poll() is not None:
            raise RuntimeError(f"redis-server exited with {process.returncode}; see {log_path}")

    try:
        wait_until_sync(
            lambda: _ping(port) and (not appendonly or _aof_ready(port)),
            _START_TIMEOUT_S,
            f"redis-server answering PING on port {port}",
            still_ok=still_running,
        )
    except BaseException:
        server.stop()
        raise
    return server
