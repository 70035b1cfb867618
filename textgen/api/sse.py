"""Server-Sent Events helpers shared by the streaming routes (sse-starlette does the transport)."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import anyio
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


# How long a stream may still run once the server itself exits (see DrainedEventSourceResponse).
SERVER_EXIT_BACKSTOP_S = 5.0


class DrainedEventSourceResponse(EventSourceResponse):
    """An event stream that ends with its own final event at shutdown, never cut in the middle.

    sse-starlette cancels every stream within ~0.5 s of the server's SIGTERM, so clients got an incomplete
    chunked body with no `done`, `error` or `[DONE]`. Here the service's drain (``textgen.state``) decides:
    open streams get TEXTGEN_SHUTDOWN_GRACE_S like any request, and when it runs out the engine fails
    their generations, so each stream sends its final error event itself. The server is told to exit only
    after that (``drain_on_signals``); the backstop below only bounds a stream that ignores it."""

    async def _listen_for_exit_signal_with_grace(self) -> None:
        await self._listen_for_exit_signal()
        await anyio.sleep(SERVER_EXIT_BACKSTOP_S)


def sse_response(events: AsyncIterator[ServerSentEvent | dict[str, Any] | str], request_id: str) -> EventSourceResponse:
    return DrainedEventSourceResponse(events, headers={REQUEST_ID_HEADER: request_id}, ping=15)
