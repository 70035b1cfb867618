"""A minimal incremental Server-Sent Events parser for the benchmark's streaming client.

It is fed decoded lines (``httpx.Response.aiter_lines()`` strips the line endings) and hands back one
event per blank line, as the WHATWG event-stream rules describe: ``event:`` sets the type (default
``message``), ``data:`` lines are joined with ``\\n``, one space after the colon is dropped, comment lines
(``: ping``) and unknown fields are ignored, and an event without data is not dispatched.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

DEFAULT_EVENT = "message"


@dataclass(frozen=True, slots=True)
class SseEvent:
    event: str
    data: str


class SseParser:
    """Turns lines into events; call ``flush`` at the end of the stream for a last unterminated event."""

    def __init__(self) -> None:
        self._event = ""
        self._data: list[str] = []

    def feed(self, line: str) -> SseEvent | None:
        """One line without its line ending; returns the event a blank line completes, else None."""
        line = line.rstrip("\r\n")
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        return None

    def flush(self) -> SseEvent | None:
        return self._dispatch()

    def _dispatch(self) -> SseEvent | None:
        event, data = self._event or DEFAULT_EVENT, self._data
        self._event, self._data = "", []
        return SseEvent(event, "\n".join(data)) if data else None


def parse_sse_lines(lines: Iterable[str]) -> list[SseEvent]:
    """Every event of a complete stream."""
    parser = SseParser()
    events = [event for line in lines if (event := parser.feed(line)) is not None]
    last = parser.flush()
    return [*events, last] if last is not None else events
