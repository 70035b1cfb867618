"""Unit tests for ``result_unless_disconnected``: a client that goes away cancels its sequence."""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

import pytest
from fastapi import Request

from textgen.api.generate import result_unless_disconnected
from textgen.engine.types import FinishReason, GenerationRequest, GenerationResult, Handle, RequestTimings
from textgen.errors import EngineError, GenerationCancelledError


class FakeRequest:
    """Just enough of a Starlette ``Request``: ``receive()`` yields ASGI messages.

    ``messages`` are returned first (each after ``delay_s``); then it reports a disconnect after
    ``disconnect_after_s``, or blocks forever when that is None.
    """

    def __init__(
        self,
        *,
        disconnect_after_s: float | None,
        messages: list[dict[str, Any]] | None = None,
        delay_s: float = 0.01,
    ) -> None:
        self.disconnect_after_s = disconnect_after_s
        self.messages = list(messages or [])
        self.delay_s = delay_s
        self.calls = 0
        self.cancelled = False

    async def receive(self) -> dict[str, Any]:
        self.calls += 1
        try:
            if self.messages:
                await asyncio.sleep(self.delay_s)
                return self.messages.pop(0)
            if self.disconnect_after_s is None:
                await asyncio.Event().wait()  # a connected client: nothing more to receive
            else:
                await asyncio.sleep(self.disconnect_after_s)
            return {"type": "http.disconnect"}
        except asyncio.CancelledError:
            self.cancelled = True
            raise


def as_request(fake: FakeRequest) -> Request:
    return cast(Request, fake)


def new_handle() -> Handle:
    return Handle(GenerationRequest(prompt="Hello"), asyncio.get_running_loop())


def make_result(text: str = "world") -> GenerationResult:
    return GenerationResult(
        text=text,
        prompt_tokens=1,
        completion_tokens=1,
        finish_reason=FinishReason.EOS,
        timings=RequestTimings(queue_s=0.0, time_to_first_token_s=0.01, total_s=0.02),
    )


async def test_disconnect_cancels_the_handle_and_raises() -> None:
    handle = new_handle()  # never finishes
    request = FakeRequest(disconnect_after_s=0.05)
    started = time.monotonic()
    with pytest.raises(GenerationCancelledError) as info:
        await asyncio.wait_for(result_unless_disconnected(as_request(request), handle), timeout=5)
    assert time.monotonic() - started < 2.0
    assert handle.cancel_requested is True
    assert "disconnected" in info.value.message
    assert info.value.status_code == 499


async def test_body_messages_before_the_disconnect_are_skipped() -> None:
    handle = new_handle()
    request = FakeRequest(
        disconnect_after_s=0.02,
        messages=[{"type": "http.request", "body": b"{}", "more_body": True}, {"type": "http.request", "body": b""}],
    )
    with pytest.raises(GenerationCancelledError):
        await asyncio.wait_for(result_unless_disconnected(as_request(request), handle), timeout=5)
    assert request.calls == 3
    assert handle.cancel_requested is True


async def test_disconnect_while_the_engine_is_still_finishing_the_cancel() -> None:
    """The engine fails the cancelled handle afterwards; nothing leaks as an unretrieved exception."""
    handle = new_handle()
    request = FakeRequest(disconnect_after_s=0.02)
    with pytest.raises(GenerationCancelledError):
        await result_unless_disconnected(as_request(request), handle)
    assert handle.cancel_requested
    handle.fail_cancelled()  # what the engine does within one step
    assert handle.done
    with pytest.raises(GenerationCancelledError):
        await handle.result()


async def test_result_first_is_returned_without_cancelling() -> None:
    handle = new_handle()
    request = FakeRequest(disconnect_after_s=None)  # stays connected
    expected = make_result("the answer")
    asyncio.get_running_loop().call_later(0.02, handle.finish, expected)
    result = await asyncio.wait_for(result_unless_disconnected(as_request(request), handle), timeout=5)
    assert result is expected
    assert handle.cancel_requested is False
    await asyncio.sleep(0.01)  # let the cancelled disconnect watcher run its cancellation
    assert request.cancelled is True  # the disconnect watcher does not outlive the call


async def test_result_before_a_later_disconnect_wins() -> None:
    handle = new_handle()
    request = FakeRequest(disconnect_after_s=0.5)
    asyncio.get_running_loop().call_later(0.01, handle.finish, make_result())
    result = await asyncio.wait_for(result_unless_disconnected(as_request(request), handle), timeout=5)
    assert result.text == "world"
    assert handle.cancel_requested is False


async def test_already_finished_handle_returns_at_once() -> None:
    handle = new_handle()
    handle.finish(make_result("done"))
    request = FakeRequest(disconnect_after_s=None)
    result = await asyncio.wait_for(result_unless_disconnected(as_request(request), handle), timeout=5)
    assert result.text == "done"
    assert handle.cancel_requested is False


async def test_engine_error_is_raised_to_the_caller_without_cancelling() -> None:
    handle = new_handle()
    request = FakeRequest(disconnect_after_s=None)
    asyncio.get_running_loop().call_later(0.01, handle.finish, None, EngineError())
    with pytest.raises(EngineError):
        await asyncio.wait_for(result_unless_disconnected(as_request(request), handle), timeout=5)
    assert handle.cancel_requested is False
