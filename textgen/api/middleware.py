"""Request ids: taken from a valid ``X-Request-ID`` header or made fresh, returned on every response.

A pure ASGI middleware (no response buffering, so streaming stays streaming). It also writes one
access-log line per request with the id, status and duration (never the body) and records the
request in the HTTP metrics.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from textgen.logging import request_id_var

logger = logging.getLogger("textgen.access")

REQUEST_ID_HEADER = "x-request-id"
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def request_id_from(scope: Scope) -> str:
    for name, value in scope.get("headers", []):
        if name == REQUEST_ID_HEADER.encode():
            candidate = str(value.decode("latin-1")).strip()
            if _VALID_REQUEST_ID.match(candidate):
                return candidate
            break
    return uuid.uuid4().hex


def _record_metrics(scope: Scope, status: int, seconds: float) -> None:
    """Label by route template (``/jobs/{job_id}``), never by raw path, to keep cardinality bounded."""
    state = getattr(getattr(scope.get("app"), "state", None), "textgen", None)
    if state is None:
        return
    route = getattr(scope.get("route"), "path", None) or "unmatched"
    state.metrics.observe_http(scope["method"], route, status, seconds)


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != REQUEST_ID_HEADER.encode()]
                headers.append((REQUEST_ID_HEADER.encode(), request_id.encode()))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            logger.info("%s %s %d %.1fms", scope["method"], scope["path"], status, elapsed * 1000)
            _record_metrics(scope, status, elapsed)
            request_id_var.reset(token)


class QuietStartupFailure:
    """When start-up already logged its one-line reason, keep the server from adding a traceback."""

    def __init__(self, app: ASGIApp, marker: str) -> None:
        self.app = app
        self.marker = marker

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def send_quietly(message: Message) -> None:
            if message["type"] == "lifespan.startup.failed" and self.marker in message.get("message", ""):
                message = {**message, "message": ""}
            await send(message)

        await self.app(scope, receive, send_quietly)
