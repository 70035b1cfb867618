"""The one map from exceptions to HTTP responses. Every error body is {"detail", "request_id"}."""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from textgen.api.schemas.native import ErrorResponse
from textgen.errors import InsufficientStorageError, StoreUnavailableError, TextGenError

logger = logging.getLogger(__name__)

INTERNAL_ERROR = "Internal server error; quote the request id when reporting it."

_DESCRIPTIONS = {
    400: "Content rejected, prompt too long for the model, or malformed text/headers (lone surrogates)",
    401: "Missing or invalid API key",
    404: "Unknown job",
    409: "Job not cancellable (already finished), or Idempotency-Key reused with another body",
    413: "Request body too large",
    422: "Request body does not match the schema",
    429: "Rate limit, token budget, stream cap or failed-key limit exceeded; see the Retry-After header",
    503: "Queue full, model not ready, or job store unavailable/locked; see the Retry-After header",
    507: "The job store is out of space (disk full, read-only, Redis out of memory); see the message",
    504: "Deadline (timeout_s) passed before generation finished",
    500: "Internal error (no details are exposed; quote the request id)",
}


# Any route may answer these: the API-key (401, 429 after repeated wrong keys), body-size (413, 400 for
# a bad Content-Length) and text (400) middleware run before routing, and a 500 can happen anywhere.
ALWAYS_POSSIBLE = (400, 401, 413, 429, 500)


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries so /docs shows each error a route can return."""
    return {
        code: {"model": ErrorResponse, "description": _DESCRIPTIONS[code]}
        for code in sorted({*codes, *ALWAYS_POSSIBLE})
    }


def error_body(detail: Any, request_id: str) -> dict[str, Any]:
    """Our error shape, the one builder for it: ``{"detail", "request_id"}``."""
    return {"detail": jsonable_encoder(detail), "request_id": request_id}


def request_id_of(request: Request) -> str:
    return str(getattr(request.state, "request_id", "-"))


class AsciiJSONResponse(JSONResponse):
    """Error bodies echo client input, which may hold lone surrogates ("\\ud800" is valid JSON):
    escaping everything to ASCII keeps such a body encodable instead of turning a 422 into a 500."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def error_response(request: Request, status: int, detail: Any, headers: dict[str, str] | None = None) -> JSONResponse:
    request_id = request_id_of(request)
    body = error_body(detail, request_id)
    return AsciiJSONResponse(body, status_code=status, headers={**(headers or {}), "X-Request-ID": request_id})


def retry_after_headers(exc: TextGenError) -> dict[str, str]:
    """``Retry-After`` (whole seconds, at least 1) for errors a client should retry later."""
    if exc.retry_after_s is None and exc.status_code not in (429, 503):
        return {}
    return {"Retry-After": str(max(1, math.ceil(exc.retry_after_s or 1)))}


async def _textgen_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, TextGenError)
    headers = retry_after_headers(exc)
    # A store condition (outage, full disk) is logged once when it starts and once when it clears
    # (textgen.storage.conditions), not once per refused request.
    if exc.status_code >= 500 and not isinstance(exc, StoreUnavailableError | InsufficientStorageError):
        logger.warning("%s: %s", type(exc).__name__, exc.message)
    return error_response(request, exc.status_code, exc.message, headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [{k: v for k, v in e.items() if k in ("type", "loc", "msg", "input")} for e in exc.errors()]
    return error_response(request, 422, errors)


def _template_matches(template: str, path: str) -> bool:
    wanted, got = template.strip("/").split("/"), path.strip("/").split("/")
    return len(wanted) == len(got) and all(
        w == g or (w.startswith("{") and g) for w, g in zip(wanted, got, strict=True)
    )


def allowed_methods(request: Request) -> str:
    """Every documented method on this path (and HEAD with GET). Starlette's 405 names only the first
    matching route's methods (``GET`` for ``/jobs/{id}``, though ``DELETE`` is there too)."""
    methods: set[str] = set()
    for template, item in request.app.openapi().get("paths", {}).items():
        if _template_matches(template, request.scope["path"]):
            methods |= {method.upper() for method in item}
    if "GET" in methods:
        methods.add("HEAD")
    return ", ".join(sorted(methods))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = allowed_methods(request) or headers.get("Allow", "")
    return error_response(request, exc.status_code, exc.detail, headers)


async def _unhandled_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("Unhandled error", exc_info=exc)
    return error_response(request, 500, INTERNAL_ERROR)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(TextGenError, _textgen_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unhandled_error)
