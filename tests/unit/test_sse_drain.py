"""Event streams are not cut when the server is told to exit: the stream sends its own final event.

sse-starlette cancels every stream within ~0.5 s of the server's exit signal, so clients saw an incomplete
body with no final event. ``textgen.api.sse`` leaves the ending to the service's drain (``textgen.state``):
the generator's final event still goes out."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sse_starlette import EventSourceResponse, ServerSentEvent
from sse_starlette.sse import AppStatus

from textgen.api.sse import DrainedEventSourceResponse, event, sse_response

SCOPE = {"type": "http", "method": "GET", "path": "/", "headers": [], "query_string": b""}


async def run_stream(response: EventSourceResponse, release: asyncio.Event) -> bytes:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and message.get("body"):
            release.set()  # the first event is out: now the generator may finish

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()  # the client never disconnects
        return {"type": "http.disconnect"}

    await asyncio.wait_for(response(SCOPE, receive, send), timeout=30)
    assert sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}  # a complete body
    return b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


async def events(release: asyncio.Event) -> AsyncIterator[ServerSentEvent]:
    yield event("token", {"text": "a"})
    await release.wait()  # the drain is still running
    yield event("error", {"detail": "The server is shutting down; retry the request.", "status": 503})


async def test_the_final_event_goes_out_after_the_server_was_told_to_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(AppStatus, "should_exit", True)  # uvicorn's exit signal has arrived
    release = asyncio.Event()
    body = await run_stream(sse_response(events(release), "rid"), release)
    assert b"event: token" in body and b"event: error" in body


async def test_the_plain_response_would_cut_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the override is for (and proof it still overrides a method sse-starlette has)."""
    assert "_listen_for_exit_signal_with_grace" in vars(DrainedEventSourceResponse)
    assert callable(getattr(EventSourceResponse, "_listen_for_exit_signal_with_grace", None))
    monkeypatch.setattr(AppStatus, "should_exit", True)
    release = asyncio.Event()
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()
        return {"type": "http.disconnect"}

    await asyncio.wait_for(EventSourceResponse(events(release))(SCOPE, receive, send), timeout=30)
    assert b"event: error" not in b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
