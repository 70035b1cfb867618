"""Access control and request hygiene as pure ASGI middleware: client address, API keys, body size, CORS.

Each reads its settings from the app state built in the lifespan, so nothing is decided at import
time. Keys are compared in constant time, never logged, and a failure says nothing about which keys
exist. The client address (``AccessPolicy.client_address``: the socket peer, or what a proxy listed in
TEXTGEN_TRUSTED_PROXIES forwarded) is decided once, outermost, and recorded as
``scope["state"]["client_address"]``; uvicorn's own X-Forwarded-For handling is taken out at start-up
(``take_over_forwarded_headers``) so that it cannot decide first. The caller (``textgen.access.Caller``)
is recorded as ``scope["state"]["caller"]`` and its rate-limit key as ``scope["state"]["principal"]``.
``AccessPolicy`` lives in ``textgen.access`` and is re-exported here for existing imports.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys

from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.config import Config as UvicornConfig
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from textgen.access import (
    UVICORN_DEFAULT_FORWARDED_ALLOW_IPS,
    AccessPolicy,
    FailedKeyLimiter,
    IPNetwork,
    bind_host_from_argv,
    describe_networks,
    is_loopback,
    owner_id_for_key,
    trusts_other_proxies,
    uvicorn_forwarded_allow_ips,
    warn_if_exposed_without_keys,
)
from textgen.api.errors import textgen_error_response
from textgen.errors import (
    ConfigError,
    InvalidRequestError,
    PayloadTooLargeError,
    RateLimitedError,
    TextGenError,
    UnauthorizedError,
    UnsupportedMediaTypeError,
)
from textgen.json_limits import DEPTH_MESSAGE, depth_check_is_slow, json_too_deep

logger = logging.getLogger(__name__)

# The playground page and its static files (HTML, CSS, JS, icons; no data) load without a key, so the page
# can ask for one. Every API call it makes is checked as usual.
PUBLIC_PAGE_PATHS = frozenset({"/", "/favicon.ico"})
PUBLIC_PAGE_PREFIX = "/static/"


def is_public_page(path: str) -> bool:
    return path in PUBLIC_PAGE_PATHS or path.startswith(PUBLIC_PAGE_PREFIX)

__all__ = [
    "APIKeyMiddleware",
    "AccessPolicy",
    "BodySizeLimitMiddleware",
    "ClientAddressMiddleware",
    "FailedKeyLimiter",
    "bind_host_from_argv",
    "is_loopback",
    "key_fingerprint",
    "server_config_of",
    "take_over_forwarded_headers",
    "warn_if_exposed_without_keys",
]


def key_fingerprint(key: str) -> str:
    return owner_id_for_key(key)


def _state(scope: Scope) -> object | None:
    return getattr(getattr(scope.get("app"), "state", None), "textgen", None)


async def _send_error(scope: Scope, receive: Receive, send: Send, error: TextGenError) -> None:
    """The error body in the shape of the API the path belongs to (OpenAI's under /v1), by the one map."""
    headers = {"WWW-Authenticate": "Bearer"} if error.status_code == 401 else {}
    await textgen_error_response(Request(scope), error, headers)(scope, receive, send)


def _headers(scope: Scope) -> dict[str, str]:
    return {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope.get("headers", [])}


CLIENT_ADDRESS = "client_address"  # scope["state"] key: the address ClientAddressMiddleware decided


def server_config_of(receive: Receive) -> UvicornConfig | None:
    """The uvicorn ``Config`` serving this app, from the lifespan's ``receive`` (a bound method of
    uvicorn's lifespan, which holds its config); None under another server or a test harness."""
    config = getattr(getattr(receive, "__self__", None), "config", None)
    return config if isinstance(config, UvicornConfig) else None


def take_over_forwarded_headers(server: object | None, trusted: tuple[IPNetwork, ...]) -> None:
    """Make the app the only judge of ``X-Forwarded-For``, before the server accepts a connection.

    uvicorn wraps the app in its ``ProxyHeadersMiddleware``, which rewrites the client address from
    X-Forwarded-For for the peers in ``--forwarded-allow-ips`` (``FORWARDED_ALLOW_IPS``; loopback by
    default) before the app sees the request, and keeps no copy of the socket peer. So the app unwraps
    it (connections made later use ``config.loaded_app``) and ``ClientAddressMiddleware`` decides from
    the socket peer and TEXTGEN_TRUSTED_PROXIES alone. Where the uvicorn cannot be reached and the
    command line says it believes other proxies than TEXTGEN_TRUSTED_PROXIES, ConfigError: refuse to
    start rather than let a caller pick its own address.
    """
    ours = describe_networks(trusted) or "nobody"
    if isinstance(server, UvicornConfig) and isinstance(server.loaded_app, ProxyHeadersMiddleware):
        server.loaded_app = server.loaded_app.app
        allowed = server.forwarded_allow_ips
    elif isinstance(server, UvicornConfig) and not server.proxy_headers:
        allowed = ""
    else:  # no uvicorn config to take over (another server, or uvicorn's --log-level trace wrapper)
        shown = uvicorn_forwarded_allow_ips(sys.argv, os.environ)
        if shown is not None and trusts_other_proxies(shown, trusted):
            raise ConfigError(
                f"uvicorn believes X-Forwarded-For from {shown or 'nobody'!r} and the service could not take that "
                f"decision over; start uvicorn with --forwarded-allow-ips '{describe_networks(trusted)}' "
                "(TEXTGEN_TRUSTED_PROXIES) or --no-proxy-headers."
            )
        return
    logger.info(
        "Client address: the socket peer; X-Forwarded-For is believed from %s (TEXTGEN_TRUSTED_PROXIES).", ours
    )
    listed = allowed if isinstance(allowed, str) else ",".join(allowed)
    if listed not in ("", UVICORN_DEFAULT_FORWARDED_ALLOW_IPS) and trusts_other_proxies(listed, trusted):
        logger.warning(
            "uvicorn was told to believe X-Forwarded-For from %r (--forwarded-allow-ips or FORWARDED_ALLOW_IPS); "
            "the service decides the client address itself and believes it only from %s: set "
            "TEXTGEN_TRUSTED_PROXIES to the proxies' addresses or networks to believe them.",
            listed,
            ours,
        )


class ClientAddressMiddleware:
    """Decides each request's client address once (``AccessPolicy.client_address``) and records it as
    ``scope["state"]["client_address"]``; a trusted proxy's forwarded client and ``X-Forwarded-Proto``
    also replace ``scope["client"]`` and ``scope["scheme"]``, as uvicorn would, so its access log shows
    them. Added outermost."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = _state(scope)
        if scope["type"] == "http" and state is not None:
            _decide_client_address(scope, state.access)  # type: ignore[attr-defined]
        await self.app(scope, receive, send)


def _decide_client_address(scope: Scope, policy: AccessPolicy) -> None:
    peer = scope.get("client")
    host = str(peer[0]) if peer else None
    headers = _forwarded_headers(scope)
    client = policy.client_address(host, headers)
    scope.setdefault("state", {})[CLIENT_ADDRESS] = client
    if policy.trusts(host):
        scope["client"] = (client, 0) if client != host else peer
        scheme = policy.forwarded_scheme(host, headers)
        if scheme is not None:
            scope["scheme"] = scheme


def _forwarded_headers(scope: Scope) -> dict[str, str]:
    """X-Forwarded-For (several header lines joined, as one list) and the last X-Forwarded-Proto."""
    hops: list[str] = []
    headers: dict[str, str] = {}
    for key, value in scope.get("headers", []):
        name = key.lower()
        if name == b"x-forwarded-for":
            hops.append(value.decode("latin-1"))
        elif name == b"x-forwarded-proto":
            headers["x-forwarded-proto"] = value.decode("latin-1")
    if hops:
        headers["x-forwarded-for"] = ", ".join(hops)
    return headers


def client_address_of(scope: Scope, policy: AccessPolicy, headers: dict[str, str]) -> str:
    decided = scope.get("state", {}).get(CLIENT_ADDRESS)
    if isinstance(decided, str):
        return decided
    peer = scope.get("client")  # ClientAddressMiddleware not installed (a bare test stack)
    return policy.client_address(str(peer[0]) if peer else None, headers)


class APIKeyMiddleware:
    """Identifies the caller (``scope["state"]["caller"]``, see ``textgen.access``); 401 for requests
    without a valid key when keys are configured (exempt paths pass), every method alike; 429 instead of
    401 for a client address that sent too many missing or wrong keys in the last minute. A valid key is
    always checked and always accepted: others' failures never lock it out."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._warned = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = _state(scope)
        if scope["type"] != "http" or state is None:
            await self.app(scope, receive, send)
            return
        policy: AccessPolicy = state.access  # type: ignore[attr-defined]
        failures: FailedKeyLimiter = state.failed_keys  # type: ignore[attr-defined]
        if not self._warned:
            server = scope.get("server")
            warn_if_exposed_without_keys(policy, server[0] if server else None)
            self._warned = True
        path = scope["path"]
        if is_public_page(path):  # the playground's page and files: the page itself asks for a key
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        client = client_address_of(scope, policy, headers)
        failures.sweep()  # logs the end of lockouts that are over (at most once a second does any work)
        try:
            caller = policy.caller(path, headers.get("authorization"), client)
        except UnauthorizedError as error:
            failure = failures.record(client)
            if failure.retry_after_s is not None:  # locked out: counted, logged when it starts and ends
                await _send_error(scope, receive, send, _too_many_failures(failure.retry_after_s))
                return
            # Never the attempted key: only where it came from and how often.
            logger.warning(
                "Rejected a missing or invalid API key from %s (%d in the last minute)", client, failure.count
            )
            await _send_error(scope, receive, send, error)
            return
        scope.setdefault("state", {})["caller"] = caller
        scope["state"]["principal"] = caller.rate_key
        await self.app(scope, receive, send)


def _too_many_failures(wait_s: float) -> RateLimitedError:
    return RateLimitedError(
        "Too many requests with a missing or invalid API key from this address "
        "(TEXTGEN_AUTH_FAILURES_PER_MINUTE); check the key, then retry after the time in the Retry-After header.",
        retry_after_s=wait_s,
    )


_ASCII_DIGITS = re.compile(r"[0-9]{1,19}")


# Room for what a multipart upload carries besides the file: boundaries, part headers, the purpose and
# expires_after fields. The file part itself is limited while it streams (textgen.batches.files).
UPLOAD_FORM_OVERHEAD_BYTES = 64 * 1024


class BodySizeLimitMiddleware:
    """413 before reading a body whose declared length is too large, or once a streamed one grows too
    large; 400 for a ``Content-Length`` that is not ASCII digits. File uploads are limited to
    TEXTGEN_BATCH_MAX_FILE_BYTES plus the form's overhead (they stream to disk, never into memory),
    every other body to TEXTGEN_MAX_BODY_BYTES."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = _state(scope)
        if scope["type"] != "http" or state is None:
            await self.app(scope, receive, send)
            return
        settings = state.settings  # type: ignore[attr-defined]
        if is_file_upload(scope):
            limit: int = settings.batch_max_file_bytes + UPLOAD_FORM_OVERHEAD_BYTES
            too_large = PayloadTooLargeError(
                f"The upload is larger than this server's limit of {settings.batch_max_file_bytes} bytes "
                "per file (TEXTGEN_BATCH_MAX_FILE_BYTES)."
            )
        else:
            limit = settings.max_body_bytes
            too_large = PayloadTooLargeError()
        declared = _header(scope, b"content-length")
        if declared is not None:
            # str.isdigit() accepts "²" and other Unicode digits that int() then refuses.
            if not _ASCII_DIGITS.fullmatch(declared.strip()):
                await _send_error(scope, receive, send, InvalidRequestError("Invalid Content-Length header."))
                return
            if int(declared) > limit:
                await _send_error(scope, receive, send, too_large)
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
                    await _send_error(scope, receive, send, too_large)
                    return {"type": "http.disconnect"}
            return message

        async def send_unless_refused(message: Message) -> None:
            if not refused:
                await send(message)

        await self.app(scope, receive_limited, send_unless_refused)


LONE_SURROGATE = "The request contains a lone UTF-16 surrogate (\\ud800-\\udfff), which is not valid text."
_JSON_TYPES = ("application/json", "+json")


def has_lone_surrogate(value: object) -> bool:
    """Whether any string in decoded JSON (keys included) holds a surrogate code point; JSON's
    "\\ud83d\\ude00" pairs decode to one character, so only unpaired ones are left."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if any("\ud800" <= char <= "\udfff" for char in item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


MULTIPART_EXPECTED = (
    "Upload the file as multipart/form-data (Content-Type: multipart/form-data; boundary=...) with the "
    "fields 'file' and 'purpose'."
)


class TextHygieneMiddleware:
    """Checks a body's shape before any route sees it, answering in the shape of the path's API:

    - a file upload that is not ``multipart/form-data`` gets 415 without a byte of it being read;
    - a JSON body (or one without a Content-Type, which FastAPI reads as JSON) nested deeper than
      ``MAX_JSON_DEPTH`` gets 400 (``json`` would raise RecursionError), one holding a lone surrogate
      gets 400 (valid JSON, but not text any encoder, tokenizer or filter can handle).

    A JSON body is read once and replayed to the app; never more than TEXTGEN_MAX_BODY_BYTES of it is
    held (the body limit refuses anything larger, and this check stops buffering past it in any case).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        content_type = (_header(scope, b"content-type") or "").split(";", 1)[0].strip().lower()
        if is_file_upload(scope):
            if content_type != "multipart/form-data" or not _has_boundary(scope):
                await _send_error(scope, receive, send, UnsupportedMediaTypeError(MULTIPART_EXPECTED))
                return
            await self.app(scope, receive, send)
            return
        # FastAPI reads a body without a Content-Type as JSON too.
        if content_type and not content_type.endswith(_JSON_TYPES):
            await self.app(scope, receive, send)
            return
        state = _state(scope)
        cap: int = state.settings.max_body_bytes if state is not None else DEFAULT_HYGIENE_CAP  # type: ignore[attr-defined]
        chunks: list[bytes] = []
        held = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left (or the size limit refused it)
                await self.app(scope, _replay([], message, receive), send)
                return
            chunk = message.get("body", b"")
            more = message.get("more_body", False)
            held += len(chunk)
            if held > cap and more:
                # Larger than any body the limit lets through: stop holding it and let the body limit
                # (or the route) answer, unchecked.
                await self.app(scope, _replay([*chunks, chunk], None, receive, more_body=True), send)
                return
            chunks.append(chunk)
            if not more:
                break
        body = b"".join(chunks)
        error = await _body_error(body)
        if error is not None:
            await _send_error(scope, receive, send, error)
            return
        await self.app(scope, _replay([body], None, receive), send)


DEFAULT_HYGIENE_CAP = 1_048_576


async def _body_error(body: bytes) -> TextGenError | None:
    """What is wrong with a JSON body before parsing: too deep, or a lone surrogate; None if neither."""
    if depth_check_is_slow(body):
        too_deep = await asyncio.to_thread(json_too_deep, body)  # a byte-by-byte walk: off the event loop
    else:
        too_deep = json_too_deep(body)
    if too_deep:
        return InvalidRequestError(DEPTH_MESSAGE)
    if b"\\u" in body and _decodes_to_lone_surrogate(body):
        return InvalidRequestError(LONE_SURROGATE)
    return None


def _has_boundary(scope: Scope) -> bool:
    header = _header(scope, b"content-type") or ""
    return any(
        part.strip().lower().startswith("boundary=") and len(part.split("=", 1)[1].strip().strip('"')) > 0
        for part in header.split(";")[1:]
    )


def _decodes_to_lone_surrogate(body: bytes) -> bool:
    try:
        return has_lone_surrogate(json.loads(body))
    except (ValueError, RecursionError):  # not JSON (or too deep): the route's own validation answers
        return False


def _replay(bodies: list[bytes], pending: Message | None, receive: Receive, *, more_body: bool = False) -> Receive:
    """A receive that first hands back what was read, then passes through (for disconnects, or the
    rest of a body when ``more_body``)."""
    queue: list[Message] = [
        {"type": "http.request", "body": b, "more_body": more_body or i < len(bodies) - 1}
        for i, b in enumerate(bodies)
    ]
    if pending is not None:
        queue.append(pending)

    async def replayed() -> Message:
        if queue:
            return queue.pop(0)
        return await receive()

    return replayed


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
    return bool(scope["method"] == "POST" and str(scope["path"]).rstrip("/") == "/v1/files")


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return None
