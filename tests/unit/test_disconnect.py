"""Unit tests for ``result_unless_disconnected``: a client that goes away cancels its sequence."""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

import pytest
from fastapi import Request

from tests.support.waiting import wait_until
from textgen.api.generate import result_unless_disconnected
from textgen.engine.types import FinishReason, GenerationRequest, GenerationResult, Handle, RequestTimings
from textgen.errors import EngineError, GenerationCancelledError


class FakeRequest:
    """Just enough of a Starlette ``Request``: ``receive()`` yields ASGI messages.

    ``messages`` are returned first; then ``receive()`` blocks until the test calls ``disconnect()`` (at once
    when ``disconnected``) and reports ``http.disconnect``: the client goes away when the test says so, not
    after some time.
    """

    def __init__(self, *, disconnected: bool = False, messages: list[dict[str, Any]] | None = None) -> None:
        self.messages = list(messages or [])
        self.calls = 0
        self.cancelled = False
        self._gone = asyncio.Event()
        if disconnected:
            self._gone.set()

    def disconnect(self) -> None:
        self._gone.set()

    async def receive(self) -> dict[str, Any]:
        self.calls += 1
        try:
            if self.messages:
                return self.messages.pop(0)
            await self._gone.wait()
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
    request = FakeRequest()
    asyncio.get_running_loop().call_soon(request.disconnect)  # once the call is waiting
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
        disconnected=True,
        messages=[{"type": "http.request", "body": b"{}", "more_body": True}, {"type": "http.request", "body": b""}],
    )
    with pytest.raises(GenerationCancelledError):
        await asyncio.wait_for(result_unless_disconnected(as_request(request), handle), timeout=5)
    assert request.calls == 3
    assert handle.cancel_requested is True


async def test_disconnect_while_the_engine_is_still_finishing_the_cancel() -> None:
    """The engine fails the cancelled handle afterwards; nothing leaks as an unretrieved exception."""
    handle = new_handle()
    request = FakeRequest(disconnected=True)
    with pytest.raises(GenerationCancelledError):
        await result_unless_disconnected(as_request(request), handle)
    assert handle.cancel_requested
    handle.fail_cancelled()  # what the engine does within one step
    assert handle.done
    with pytest.raises(GenerationCancelledError):
        await handle.result()


async def test_result_first_is_returned_without_cancelling() -> None:
    handle = new_handle()
    request = FakeRequest()  # stays connected
    expected = make_result("the answer")
    asyncio.get_running_loop().call_soon(handle.finish, expected)  # once the call is waiting
    result = await asyncio.wait_for(result_unless_disconnected(as_request(request), handle), timeout=5)
    assert result is expected
    assert handle.cancel_requested is False
    # The disconnect watcher does not outlive the call: its cancellation reaches receive().
    await wait_until(lambda: request.cancelled, 5, "the disconnect watcher being cancelled")


async def test_result_before_a_later_disconnect_wins() -> None:
    handle = new_handle()
    request = FakeRequest()
    loop = asyncio.get_running_loop()
    loop.call_soon(handle.finish, make_result())
    loop.call_soon(loop.call_soon, request.disconnect)  # the client leaves one loop turn after the result
    result = await asyncio.wait_for(result_unless_disconnected(as_request(request), handle), timeout=5)
    assert result.text == "world"
    assert handle.cancel_requested is False


async def test_already_finished_handle_returns_at_once() -> None:
    handle = new_handle()
    handle.finish(make_result("done"))
    request = FakeRequest()
    result = await asyncio.wait_for(result_unless_disconnected(as_request(request), handle), timeout=5)
    assert result.text == "done"
    assert handle.cancel_requested is False


async def test_engine_error_is_raised_to_the_caller_without_cancelling() -> None:
    handle = new_handle()
    request = FakeRequest()
    asyncio.get_running_loop().call_soon(handle.finish, None, EngineError())
    with pytest.raises(EngineError):
        await asyncio.wait_for(result_unless_disconnected(as_request(request), handle), timeout=5)
    assert handle.cancel_requested is False
