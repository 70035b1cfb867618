"""Server-Sent Events helpers shared by the streaming routes (sse-starlette does the transport)."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from sse_starlette import EventSourceResponse, ServerSentEvent

from textgen.api.errors import error_body
from textgen.api.middleware import REQUEST_ID_HEADER
from textgen.errors import EngineError, TextGenError

logger = logging.getLogger(__name__)

# Each Server-Sent Event, as a client parser sees it: an optional event name and its data line(s).
SSE_EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"event": {"type": "string"}, "data": {"type": "string"}, "id": {"type": "string"}},
}
SSE_RESPONSE_DOC: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "JSON, or with `stream: true` a `text/event-stream` of events (see the route summary)",
        "content": {"text/event-stream": {"schema": SSE_EVENT_SCHEMA}},
    }
}


def event(name: str, payload: Any) -> ServerSentEvent:
    # ASCII-only JSON: U+2028 / U+0085 in generated text would otherwise split lines for some SSE parsers.
    return ServerSentEvent(data=json.dumps(payload, ensure_ascii=True), event=name)


def error_event(error: BaseException, request_id: str) -> ServerSentEvent:
    """Errors after the stream started cannot change the status code; they become an event."""
    if not isinstance(error, TextGenError):
        logger.error("Stream failed", exc_info=error, extra={"request_id": request_id})
        error = EngineError()
    return event("error", {**error_body(error.message, request_id), "status": error.status_code})


def sse_response(events: AsyncIterator[ServerSentEvent | dict[str, Any] | str], request_id: str) -> EventSourceResponse:
    return EventSourceResponse(events, headers={REQUEST_ID_HEADER: request_id}, ping=15)
