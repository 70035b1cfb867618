"""Access control and request hygiene as pure ASGI middleware: API keys, body size, CORS.

Each reads its settings from the app state built in the lifespan, so nothing is decided at import
time. Keys are compared in constant time, never logged, and a failure says nothing about which keys
exist. The authenticated caller is recorded as ``scope["state"]["principal"]``: a short hash of the
key (or the client address when auth is off), which is what rate limits count against.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from textgen.errors import ConfigError, PayloadTooLargeError, UnauthorizedError

logger = logging.getLogger(__name__)

OPENAI_PREFIX = "/v1/"
# The playground page and its static files (HTML, CSS, JS, icons; no data) load without a key, so the page
# can ask for one. Every API call it makes is checked as usual.
PUBLIC_PAGE_PATHS = frozenset({"/", "/favicon.ico"})
PUBLIC_PAGE_PREFIX = "/static/"


def is_public_page(path: str) -> bool:
    return path in PUBLIC_PAGE_PATHS or path.startswith(PUBLIC_PAGE_PREFIX)


def key_fingerprint(key: str) -> str:
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class AccessPolicy:
    keys: tuple[bytes, ...]
    exempt_paths: frozenset[str]

    @classmethod
    def from_sources(cls, keys: Iterable[str], keys_file: Path | None, exempt_paths: Iterable[str]) -> AccessPolicy:
        all_keys = [k.strip() for k in keys if k.strip()]
        if keys_file is not None:
            all_keys += _read_keys_file(keys_file)
        return cls(tuple(k.encode() for k in all_keys), frozenset(exempt_paths))

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def principal_for(self, authorization: str | None) -> str:
        """The caller's principal for a valid ``Bearer`` key; UnauthorizedError otherwise."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise UnauthorizedError()
        candidate = token.strip().encode()
        # Compare against every key, without stopping early, so timing says nothing about the keys.
        matched = False
        for key in self.keys:
            matched |= hmac.compare_digest(candidate, key)
        if not matched:
            raise UnauthorizedError()
        return key_fingerprint(candidate.decode())


def _read_keys_file(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise ConfigError(f"Cannot read TEXTGEN_API_KEYS_FILE {path}: {error.strerror}.") from None
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def is_loopback(host: str | None) -> bool:
    if not host or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind_host_from_argv(argv: list[str] | None = None) -> str | None:
    """The --host uvicorn was started with, if visible (``uvicorn main:app --host 0.0.0.0``)."""
    args = sys.argv if argv is None else argv
    for index, arg in enumerate(args):
        if arg == "--host" and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith("--host="):
            return arg.split("=", 1)[1]
    return None


def warn_if_exposed_without_keys(policy: AccessPolicy, host: str | None) -> bool:
    if policy.enabled or is_loopback(host):
        return False
    logger.warning(
        "!!! SECURITY: serving on %s without API keys: anyone who can reach this address can use the model. "
        "Set TEXTGEN_API_KEYS (or TEXTGEN_API_KEYS_FILE), or bind to 127.0.0.1. !!!",
        host,
    )
    return True


def _state(scope: Scope) -> object | None:
    return getattr(getattr(scope.get("app"), "state", None), "textgen", None)


def _request_id(scope: Scope) -> str:
    return str(scope.get("state", {}).get("request_id", "-"))


async def _send_error(
    scope: Scope, receive: Receive, send: Send, error: UnauthorizedError | PayloadTooLargeError
) -> None:
    """The error body in the shape of the API the path belongs to (OpenAI's under /v1)."""
    headers = {"WWW-Authenticate": "Bearer"} if error.status_code == 401 else {}
    request_id = _request_id(scope)
    body: dict[str, object] = {"detail": error.message, "request_id": request_id}
    if scope["path"].startswith(OPENAI_PREFIX):
        kind = "authentication_error" if error.status_code == 401 else "invalid_request_error"
        body = {
            "error": {"message": error.message, "type": kind, "param": None, "code": None},
            "request_id": request_id,
        }
    await JSONResponse(body, status_code=error.status_code, headers=headers)(scope, receive, send)


class APIKeyMiddleware:
    """401 for requests without a valid key when keys are configured (exempt paths pass)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._warned = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = _state(scope)
        if scope["type"] != "http" or state is None:
            await self.app(scope, receive, send)
            return
        policy: AccessPolicy = state.access  # type: ignore[attr-defined]
        if not self._warned:
            server = scope.get("server")
            warn_if_exposed_without_keys(policy, server[0] if server else None)
            self._warned = True
        path = scope["path"]
        exempt = path in policy.exempt_paths or is_public_page(path) or scope["method"] == "OPTIONS"
        if policy.enabled and not exempt:
            try:
                principal = policy.principal_for(_header(scope, b"authorization"))
            except UnauthorizedError as error:
                await _send_error(scope, receive, send, error)
                return
        else:
            client = scope.get("client")
            principal = f"client:{client[0] if client else 'unknown'}"
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)


class BodySizeLimitMiddleware:
    """413 before reading a body whose declared length is too large, or once a streamed one grows too large."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = _state(scope)
        if scope["type"] != "http" or state is None:
            await self.app(scope, receive, send)
            return
        if is_file_upload(scope):
            # Uploads stream to disk and have their own limit (TEXTGEN_BATCH_MAX_FILE_BYTES, textgen.batches.files).
            await self.app(scope, receive, send)
            return
        limit: int = state.settings.max_body_bytes  # type: ignore[attr-defined]
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _send_error(scope, receive, send, PayloadTooLargeError())
            return
        received = 0
        refused = False

        async def receive_limited() -> Message:
            # Raising here would surface as FastAPI's generic 400; answer 413 ourselves and let the
            # app see a disconnect instead.
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request" and not refused:
                received += len(message.get("body", b""))
                if received > limit:
                    refused = True
                    await _send_error(scope, receive, send, PayloadTooLargeError())
                    return {"type": "http.disconnect"}
            return message

        async def send_unless_refused(message: Message) -> None:
            if not refused:
                await send(message)

        await self.app(scope, receive_limited, send_unless_refused)


class SettingsCORSMiddleware:
    """Starlette's CORS middleware with origins from TEXTGEN_CORS_ORIGINS (off when empty)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._cors: CORSMiddleware | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = _state(scope)
        origins: list[str] = state.settings.cors_origins if state is not None else []  # type: ignore[attr-defined]
        if scope["type"] != "http" or not origins:
            await self.app(scope, receive, send)
            return
        if self._cors is None:
            self._cors = CORSMiddleware(
                self.app,
                allow_origins=origins,
                allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
                allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "X-Request-ID"],
                expose_headers=["X-Request-ID", "Retry-After", "Location"],
            )
        await self._cors(scope, receive, send)


def is_file_upload(scope: Scope) -> bool:
    return scope["method"] == "POST" and scope["path"].rstrip("/") == "/v1/files"


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None
