"""A real webhook receiver for tests: an HTTP server on a free loopback port, in a background thread."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic() when it arrived

    def json(self) -> Any:
        return json.loads(self.body)


class WebhookReceiver:
    """A real HTTP server on a free loopback port, served from a background thread.

    Records every request (method, path, headers, raw body) and answers POSTs to ``/hook`` with the
    next status of ``statuses`` (the last one repeats); a 3xx answer points ``Location`` at
    ``/elsewhere``, which answers 200, so a followed redirect would show up as a second request.
    """

    def __init__(self, statuses: Sequence[int] = (200,)) -> None:
        self.requests: list[Received] = []
        self._statuses = list(statuses)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="webhook-receiver", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def posts(self) -> list[Received]:
        with self._lock:
            return [r for r in self.requests if r.method == "POST"]

    def __enter__(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _record(self, handler: BaseHTTPRequestHandler) -> int:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        received = Received(handler.command, handler.path, dict(handler.headers.items()), body, time.monotonic())
        with self._lock:
            self.requests.append(received)
            if handler.path != "/hook":
                return 200
            return self._statuses.pop(0) if len(self._statuses) > 1 else self._statuses[0]

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                status = receiver._record(self)
                self.send_response(status)
                if 300 <= status < 400:
                    self.send_header("Location", "/elsewhere")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            do_POST = _answer
            do_GET = _answer

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler
