"""The one map from exceptions to HTTP responses. Every error body is {"detail", "request_id"}, except under
``/v1`` and on vLLM's ``/tokenize`` and ``/detokenize``, where it is OpenAI's
``{"error": {"message", "type", "param", "code"}, "request_id"}`` (so OpenAI clients show the message):
the app's handlers, the ``/v1`` routes (``OpenAIRoute``) and the middleware that answers before routing
(``textgen.api.security``) all render through ``textgen_error_response``, ``http_error_response`` and
``validation_error_response`` here."""

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
from textgen.services.openai_types import openai_error_body
from textgen.services.requests import describe_validation_errors

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


OPENAI_PREFIX = "/v1"
# vLLM's tokenizer routes: vLLM serves them beside its OpenAI routes and answers their errors in OpenAI's
# shape, so the clients that call them (written for vLLM) read that shape here too.
OPENAI_SHAPED_PATHS = frozenset({"/tokenize", "/detokenize"})


def is_openai_path(path: str) -> bool:
    """Whether a path belongs to the OpenAI-compatible API family (its errors take OpenAI's shape)."""
    return path == OPENAI_PREFIX or path.startswith(OPENAI_PREFIX + "/") or path in OPENAI_SHAPED_PATHS


def openai_error_response(
    request: Request,
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    request_id = request_id_of(request)
    body = openai_error_body(status, message, request_id, param, code)
    return AsciiJSONResponse(body, status_code=status, headers={**(headers or {}), "X-Request-ID": request_id})


def retry_after_headers(exc: TextGenError) -> dict[str, str]:
    """``Retry-After`` (whole seconds, at least 1) for errors a client should retry later."""
    if exc.retry_after_s is None and exc.status_code not in (429, 503):
        return {}
    return {"Retry-After": str(max(1, math.ceil(exc.retry_after_s or 1)))}


def textgen_error_response(request: Request, exc: TextGenError, headers: dict[str, str] | None = None) -> JSONResponse:
    """A ``TextGenError`` in the shape of the path's API, with ``Retry-After`` where a retry helps."""
    headers = {**retry_after_headers(exc), **(headers or {})}
    if is_openai_path(request.scope["path"]):
        return openai_error_response(request, exc.status_code, exc.message, exc.shown_param, exc.code, headers)
    return error_response(request, exc.status_code, exc.message, headers)


async def _textgen_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, TextGenError)
    # A store condition (outage, full disk) is logged once when it starts and once when it clears
    # (textgen.storage.conditions), not once per refused request.
    if exc.status_code >= 500 and not isinstance(exc, StoreUnavailableError | InsufficientStorageError):
        logger.warning("%s: %s", type(exc).__name__, exc.message)
    return textgen_error_response(request, exc)


def json_syntax_message(position: int, document: object, detail: str = "") -> str:
    """Where a body's JSON breaks, as line and column (and the character offset), with the fix."""
    where = f"at character {position}"
    if isinstance(document, bytes):
        document = document.decode("utf-8", "replace")
    if isinstance(document, str) and 0 <= position <= len(document):
        line = document.count("\n", 0, position) + 1
        column = position - (document.rfind("\n", 0, position) + 1) + 1
        where = f"at line {line}, column {column} (character {position})"
    reason = f": {detail}" if detail else ""
    return f"The request body is not valid JSON: the syntax breaks {where}{reason}. Send one JSON object."


def _openai_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """OpenAI answers schema errors with 400 naming the field (``param``); a body that is not JSON at all
    (broken syntax, or sent as another media type) is a 400 that names no field and says what to send."""
    first = exc.errors()[0]
    loc = tuple(first.get("loc", ()))
    if first.get("type") == "json_invalid":
        position = loc[1] if len(loc) > 1 and isinstance(loc[1], int) else -1
        detail = str(first.get("ctx", {}).get("error", ""))
        return openai_error_response(request, 400, json_syntax_message(position, exc.body, detail))
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if loc == ("body",) and isinstance(exc.body, bytes) and content_type and not content_type.endswith("json"):
        message = f"The body was sent as {content_type!r}; send a JSON object with Content-Type: application/json."
        return openai_error_response(request, 400, message)
    if loc == ("body",) and first.get("type") == "missing":
        return openai_error_response(request, 400, "The request body is empty; send a JSON object.")
    param, message = describe_validation_errors(exc.errors())
    return openai_error_response(request, 400, message, param)


def validation_error_response(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A body that does not match the schema: 422 with every error, or OpenAI's 400 under ``/v1``."""
    if is_openai_path(request.scope["path"]):
        return _openai_validation_error(request, exc)
    errors = [{k: v for k, v in e.items() if k in ("type", "loc", "msg", "input")} for e in exc.errors()]
    return error_response(request, 422, errors)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return validation_error_response(request, exc)


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


def _openai_http_message(request: Request, status: int, detail: str, allowed: str) -> str:
    """OpenAI-style messages for routing errors: what was asked and how to get it right."""
    asked = f"{request.method} {request.scope['path']}"
    if status == 404 and request.scope.get("route") is None:  # no route matched (a route's own 404 keeps its text)
        return f"Invalid URL ({asked}): this server has no such route; see /docs for the routes it serves."
    if status == 405:
        return f"Method not allowed ({asked}); this route accepts {allowed or 'other methods'} (see the Allow header)."
    return detail


def http_error_response(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Routing errors (unknown path, wrong method) and any other HTTPException, in the path's API shape."""
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = allowed_methods(request) or headers.get("Allow", "")
    if is_openai_path(request.scope["path"]):
        message = _openai_http_message(request, exc.status_code, str(exc.detail), headers.get("Allow", ""))
        return openai_error_response(request, exc.status_code, message, headers=headers)
    return error_response(request, exc.status_code, exc.detail, headers)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return http_error_response(request, exc)


async def _unhandled_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("Unhandled error", exc_info=exc)
    if is_openai_path(request.scope["path"]):
        return openai_error_response(request, 500, INTERNAL_ERROR)
    return error_response(request, 500, INTERNAL_ERROR)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(TextGenError, _textgen_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unhandled_error)
