"""Integration tests of every streamed shape: ``POST /generate`` with ``"stream": true`` and
``GET /jobs/{job_id}/stream`` (Server-Sent Events), through HTTP with the app lifespan running.

``httpx.ASGITransport`` collects the whole response body before it returns, so it can check what a
stream contains but never show a stream in progress or let the client leave early. The tests that need
that use ``StreamingASGITransport`` below: it hands each body chunk to the client as the app sends it
and answers the app's ``receive()`` with ``http.disconnect`` once the client closes the response, as a
real server does when the connection drops.

Events are parsed by hand: ``event:``/``data:`` fields, a blank line ends an event. Lines are split on
CR, LF and CRLF only (the SSE rule), not with ``aiter_lines()``, which also splits on U+0085/U+2028,
characters the tiny random model can produce and that ``json.dumps(ensure_ascii=False)`` leaves raw.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from tests.support.waiting import wait_until
from textgen.api import jobs as jobs_api
from textgen.content_filter import ContentFilter

MakeSettings = Callable[..., Any]
AppClient = Callable[..., Any]
Event = tuple[str, Any]

PROMPT = "The future of AI is"
RESPONSE_FIELDS = {
    "generated_text",
    "model",
    "request_id",
    "prompt_tokens",
    "completion_tokens",
    "finish_reason",
    "timings",
}
# Long enough to still be generating seconds after the first token (the tiny model's context caps it).
LONG_STREAM = {"prompt": PROMPT, "max_new_tokens": 900, "ignore_eos": True, "stream": True}
FILTER_PROMPT = "Whatever happens"
FILTER_REQUEST = {"prompt": FILTER_PROMPT, "temperature": 0, "max_new_tokens": 24, "ignore_eos": True}
OUTPUT_REJECTED = "The generated text was withheld by the content filter."
TERMINAL = {"succeeded", "failed", "cancelled"}

_EOL = re.compile(r"\r\n|\r|\n")


# ----- SSE parsing ---------------------------------------------------------------------------------------


async def sse_lines(response: httpx.Response) -> AsyncIterator[str]:
    """Lines of an event stream, split on CRLF, CR or LF only."""
    buffer = ""
    async for text in response.aiter_text():
        buffer += text
        while (end := _EOL.search(buffer)) is not None:
            if end.group() == "\r" and end.end() == len(buffer):
                break  # the "\n" of a "\r\n" may still be on its way
            yield buffer[: end.start()]
            buffer = buffer[end.end() :]
    for line in _EOL.split(buffer) if buffer else []:
        yield line


async def sse_events(response: httpx.Response) -> AsyncIterator[Event]:
    """(event name, JSON-decoded data) for each event; comments (pings) are skipped."""
    name: str | None = None
    data: list[str] = []
    async for line in sse_lines(response):
        if not line:
            if data:
                yield name or "message", json.loads("\n".join(data))
            name, data = None, []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            name = value
        elif field == "data":
            data.append(value)
    if data:
        yield name or "message", json.loads("\n".join(data))


async def collect_stream(
    client: httpx.AsyncClient, method: str, url: str, **kwargs: Any
) -> tuple[httpx.Response, list[Event]]:
    async with client.stream(method, url, **kwargs) as response:
        assert response.status_code == 200, (await response.aread()).decode()
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [event async for event in sse_events(response)]
    return response, events


def names(events: list[Event]) -> list[str]:
    return [name for name, _ in events]


def token_text(events: list[Event]) -> str:
    return "".join(data["text"] for name, data in events if name == "token")


# ----- a transport that really streams ------------------------------------------------------------------


class _StreamedBody(httpx.AsyncByteStream):
    def __init__(self, chunks: asyncio.Queue[bytes | None], disconnected: asyncio.Event, app_task: asyncio.Task[None]):
        self._chunks = chunks
        self._disconnected = disconnected
        self._app_task = app_task

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while (chunk := await self._chunks.get()) is not None:
            yield chunk

    async def aclose(self) -> None:
        """The client hangs up: the app's next receive() is http.disconnect; wait for the app to end."""
        self._disconnected.set()
        done, _ = await asyncio.wait({self._app_task}, timeout=5.0)
        if not done:
            self._app_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._app_task
            raise AssertionError("the app was still running 5 s after the client disconnected")
        self._app_task.result()  # surface an exception the app raised


class StreamingASGITransport(httpx.AsyncBaseTransport):
    """Runs the ASGI app in its own task; the response returns at ``http.response.start`` and its body
    arrives chunk by chunk. Closing the response makes ``receive()`` report ``http.disconnect``."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.AsyncByteStream)
        body = b"".join([part async for part in request.stream])
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": request.method,
            "headers": [(key.lower(), value) for key, value in request.headers.raw],
            "scheme": request.url.scheme,
            "path": request.url.path,
            "raw_path": request.url.raw_path.split(b"?")[0],
            "query_string": request.url.query,
            "server": (request.url.host, request.url.port),
            "client": ("127.0.0.1", 123),
            "root_path": "",
        }
        loop = asyncio.get_running_loop()
        started: asyncio.Future[dict[str, Any]] = loop.create_future()
        chunks: asyncio.Queue[bytes | None] = asyncio.Queue()
        disconnected = asyncio.Event()
        body_sent = False

        async def receive() -> dict[str, Any]:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await disconnected.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                started.set_result(message)
            elif message["type"] == "http.response.body" and not disconnected.is_set():
                if message.get("body"):
                    chunks.put_nowait(message["body"])
                if not message.get("more_body", False):
                    chunks.put_nowait(None)

        async def run() -> None:
            try:
                await self.app(scope, receive, send)  # type: ignore[arg-type]
            except BaseException as error:
                if not started.done():
                    started.set_exception(error)
                    return
                raise
            finally:
                chunks.put_nowait(None)
                if not started.done():
                    started.set_exception(RuntimeError("the app returned without starting a response"))

        app_task = asyncio.create_task(run())
        start = await started
        return httpx.Response(
            start["status"],
            headers=start.get("headers", []),
            stream=_StreamedBody(chunks, disconnected, app_task),
            request=request,
        )


@contextlib.asynccontextmanager
async def streaming_client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = StreamingASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=60) as client:
        yield client


# ----- small helpers -------------------------------------------------------------------------------------


async def submit_job(client: httpx.AsyncClient, body: dict[str, Any]) -> str:
    response = await client.post("/generate_background", json=body)
    assert response.status_code == 202, response.text
    return str(response.json()["job_id"])


async def poll_job(
    client: httpx.AsyncClient, job_id: str, until: Callable[[dict[str, Any]], bool], timeout_s: float = 60.0
) -> dict[str, Any]:
    view: dict[str, Any] = {}

    async def there() -> bool:
        response = await client.get(f"/jobs/{job_id}")
        assert response.status_code == 200, response.text
        view.clear()
        view.update(response.json())
        return until(view)

    await wait_until(there, timeout_s, f"job {job_id} getting there (last: {view.get('state')})", interval_s=0.05)
    return view


def assert_json_error(response: httpx.Response, status: int) -> Any:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"detail", "request_id"}, body
    assert response.headers["X-Request-ID"] == body["request_id"]
    return body["detail"]


_GREEDY: dict[str, tuple[str, str]] = {}


async def greedy_output_and_word(make_settings: MakeSettings, app_client: AppClient) -> tuple[str, str]:
    """The tiny model's greedy continuation of FILTER_PROMPT and a word in it worth blocking: letters
    only, >= 3 of them, not in the prompt, and never part of a longer word there (so a plain substring
    check on the output is exact). The most frequent such word is picked."""
    if "result" not in _GREEDY:
        async with app_client(make_settings(blocked_words=[])) as (client, _app):
            response = await client.post("/generate", json=FILTER_REQUEST)
            assert response.status_code == 200, response.text
            original = response.json()["generated_text"]
        lowered = original.lower()
        words = Counter(w.lower() for w in re.findall(r"[^\W_]+", original) if w.isascii() and w.isalpha())
        candidates = [
            word
            for word, count in words.most_common()
            if len(word) >= 3 and word not in FILTER_PROMPT.lower() and lowered.count(word) == count
        ]
        assert candidates, f"the greedy output has no word to block: {original!r}"
        _GREEDY["result"] = (original, candidates[0])
    return _GREEDY["result"]


# ----- POST /generate, stream: true ----------------------------------------------------------------------


async def test_generate_stream_is_tokens_then_one_done(make_settings: MakeSettings, app_client: AppClient) -> None:
    request = {"prompt": PROMPT, "max_new_tokens": 24, "ignore_eos": True, "temperature": 0}
    async with app_client(make_settings()) as (client, app):
        response, events = await collect_stream(client, "POST", "/generate", json={**request, "stream": True})
        plain = await client.post("/generate", json=request)
        assert plain.status_code == 200, plain.text
        echoed, echoed_events = await collect_stream(
            client, "POST", "/generate", json={**request, "stream": True}, headers={"X-Request-ID": "stream-id-1"}
        )

    assert len(events) >= 2, events
    assert names(events) == ["token"] * (len(events) - 1) + ["done"], names(events)
    for _, data in events[:-1]:
        assert set(data) == {"text"}, data
        assert isinstance(data["text"], str) and data["text"], data

    done = events[-1][1]
    assert set(done) >= RESPONSE_FIELDS, done
    assert done["generated_text"] == token_text(events)
    assert done["request_id"] == response.headers["X-Request-ID"]
    assert done["model"] == app.state.textgen.model.name
    assert done["completion_tokens"] == 24
    assert done["finish_reason"] == "length"
    assert done["prompt_tokens"] == plain.json()["prompt_tokens"] > 0
    assert done["timings"]["total_s"] >= done["timings"]["queue_s"] >= 0
    assert done["timings"]["time_to_first_token_s"] is not None
    # Streaming changes how the text travels, not what it is.
    assert done["generated_text"] == plain.json()["generated_text"]
    # A valid client request id is used for the stream too.
    assert echoed.headers["X-Request-ID"] == "stream-id-1"
    assert names(echoed_events)[-1] == "done"
    assert echoed_events[-1][1]["request_id"] == "stream-id-1"
    assert echoed_events[-1][1]["generated_text"] == done["generated_text"]


async def test_errors_before_the_stream_starts_are_plain_json(
    make_settings: MakeSettings, app_client: AppClient
) -> None:
    async with app_client(make_settings()) as (client, app):
        blocked = await client.post("/generate", json={"prompt": "I hate this", "stream": True})
        assert "content filter" in assert_json_error(blocked, 400)

        invalid = await client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 0, "stream": True})
        detail = assert_json_error(invalid, 422)
        assert any(error["loc"][-1] == "max_new_tokens" for error in detail), detail

        missing = await client.post("/generate", json={"stream": True})
        assert_json_error(missing, 422)
        assert app.state.textgen.engine.stats().running == 0


async def test_deadline_after_the_stream_started_is_an_error_event(
    make_settings: MakeSettings, app_client: AppClient
) -> None:
    async with app_client(make_settings()) as (client, app):
        started = time.monotonic()
        response, events = await collect_stream(client, "POST", "/generate", json={**LONG_STREAM, "timeout_s": 0.05})
        elapsed = time.monotonic() - started
        # The engine is free again (the sequence left the batch) and keeps serving.
        await wait_until(lambda: app.state.textgen.engine.stats().running == 0, 2.0, "the sequence leaving")
        after = await client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 2, "ignore_eos": True})
        assert after.status_code == 200

    assert names(events)[-1] == "error", names(events)
    assert set(names(events)[:-1]) <= {"token"}, names(events)  # no done event
    error = events[-1][1]
    assert error["status"] == 504, error
    assert "deadline" in error["detail"]
    assert error["request_id"] == response.headers["X-Request-ID"]
    assert elapsed < 10, f"900 tokens were generated despite the 0.05 s deadline ({elapsed:.1f} s)"


async def test_streamed_output_is_redacted(make_settings: MakeSettings, app_client: AppClient) -> None:
    original, word = await greedy_output_and_word(make_settings, app_client)
    assert word in original.lower()
    settings = make_settings(blocked_words=[word], output_filter_action="redact")
    async with app_client(settings) as (client, _app):
        _response, events = await collect_stream(client, "POST", "/generate", json={**FILTER_REQUEST, "stream": True})

    assert names(events)[-1] == "done", names(events)
    streamed = token_text(events)
    for _, data in events[:-1]:
        assert word not in data["text"].lower(), data
    assert word not in streamed.lower().replace("[redacted]", "|"), streamed
    assert "[redacted]" in streamed
    done = events[-1][1]
    assert word not in done["generated_text"].lower().replace("[redacted]", "|")
    assert done["generated_text"] == ContentFilter([word]).redact(original)
    assert streamed == done["generated_text"]


async def test_streamed_output_is_rejected_with_an_error_event(
    make_settings: MakeSettings, app_client: AppClient
) -> None:
    _original, word = await greedy_output_and_word(make_settings, app_client)
    settings = make_settings(blocked_words=[word], output_filter_action="reject")
    async with app_client(settings) as (client, app):
        response, events = await collect_stream(client, "POST", "/generate", json={**FILTER_REQUEST, "stream": True})
        await wait_until(lambda: app.state.textgen.engine.stats().running == 0, 2.0, "the sequence leaving")

    assert names(events)[-1] == "error", names(events)
    assert set(names(events)[:-1]) <= {"token"}, names(events)
    error = events[-1][1]
    assert error["status"] == 400, error
    assert error["detail"] == OUTPUT_REJECTED
    assert error["request_id"] == response.headers["X-Request-ID"]
    assert word not in token_text(events).lower()


# ----- client disconnect --------------------------------------------------------------------------------


async def test_disconnect_cancels_the_generation(make_settings: MakeSettings, app_client: AppClient) -> None:
    async with app_client(make_settings()) as (_client, app):
        engine = app.state.textgen.engine
        registry = app.state.textgen.metrics.registry
        async with streaming_client(app) as client:
            async with client.stream("POST", "/generate", json=LONG_STREAM) as response:
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                events = sse_events(response)
                name, data = await anext(events)
                assert name == "token" and data["text"], (name, data)
                # The first token arrived while the other ~899 are still being generated.
                assert engine.stats().running == 1
                await events.aclose()
            # Leaving the block closed the response: the app saw http.disconnect.
            took = await wait_until(lambda: engine.stats().running == 0, 2.0, "the sequence leaving the batch")
        # Cancelled, not finished: no finished generation was recorded.
        finished = registry.get_sample_value("textgen_generation_requests_total", {"finish_reason": "length"})
        assert not finished, f"the generation ran to its end ({finished}) instead of being cancelled"
        assert took < 2.0


# ----- GET /jobs/{job_id}/stream ------------------------------------------------------------------------


@pytest.fixture
def quick_job_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    """The job stream polls the store every STREAM_POLL_S (0.25 s) while a job is not running here, and a
    job that starts and ends within one poll streams no tokens (see test_a_short_job_is_streamed_live).
    Polling often keeps the tests below about the live phase independent of how fast the machine is."""
    monkeypatch.setattr(jobs_api, "STREAM_POLL_S", 0.01)


async def test_job_stream_unknown_id_is_404_json(make_settings: MakeSettings, app_client: AppClient) -> None:
    async with app_client(make_settings()) as (client, _app):
        response = await client.get("/jobs/no-such-job/stream")
        assert "No job" in assert_json_error(response, 404)


@pytest.mark.usefixtures("quick_job_polls")
async def test_job_stream_follows_a_job_from_queued_to_done(make_settings: MakeSettings, app_client: AppClient) -> None:
    """One job at a time: a second job waits 'queued' behind a long one; the stream connects then, sees
    'queued', and (once the long one is cancelled) 'running', the tokens, 'succeeded' and the final job."""
    async with app_client(make_settings(job_concurrency=1)) as (client, app):
        blocker = await submit_job(client, {"prompt": PROMPT, "max_new_tokens": 1000, "ignore_eos": True})
        await poll_job(client, blocker, lambda view: view["state"] == "running")
        job_id = await submit_job(client, {"prompt": PROMPT, "max_new_tokens": 80, "ignore_eos": True})

        async with (
            streaming_client(app) as streaming,
            asyncio.timeout(60),
            streaming.stream("GET", f"/jobs/{job_id}/stream") as response,
        ):
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            assert response.headers["X-Request-ID"]
            stream = sse_events(response)
            first = await anext(stream)
            assert first == ("state", {"state": "queued"})
            cancelled = await client.delete(f"/jobs/{blocker}")
            assert cancelled.status_code == 200, cancelled.text
            events = [first, *[event async for event in stream]]

    states = [data["state"] for name, data in events if name == "state"]
    assert states == ["queued", "running", "succeeded"], states
    order = names(events)
    running_at = events.index(("state", {"state": "running"}))
    succeeded_at = events.index(("state", {"state": "succeeded"}))
    tokens_at = [i for i, name in enumerate(order) if name == "token"]
    assert tokens_at, order
    assert running_at < min(tokens_at) and max(tokens_at) < succeeded_at, order
    assert order[-1] == "done" and order.count("done") == 1, order
    assert "error" not in order

    done = events[-1][1]
    assert done["job_id"] == job_id
    assert done["state"] == "succeeded"
    assert done["result"]["completion_tokens"] == 80
    assert done["result"]["generated_text"]
    assert token_text(events) == done["result"]["generated_text"]


@pytest.mark.usefixtures("quick_job_polls")
async def test_job_stream_tokens_spell_the_result(make_settings: MakeSettings, app_client: AppClient) -> None:
    """Connected before the first token, or late (tokens replayed from the start): the token events
    concatenate to exactly the job's generated_text."""
    body = {"prompt": PROMPT, "max_new_tokens": 60, "ignore_eos": True}
    async with app_client(make_settings()) as (client, app):
        runner = app.state.textgen.runner
        texts: list[tuple[str, str]] = []

        early = await submit_job(client, body)  # connects at once (usually before the first token)
        _response, events = await collect_stream(client, "GET", f"/jobs/{early}/stream")
        texts.append((token_text(events), events[-1][1]["result"]["generated_text"]))

        late = await submit_job(client, {**body, "max_new_tokens": 120})  # connect once some tokens exist
        await wait_until(
            lambda: (handle := runner.local_handle(late)) is not None and bool(handle.text_so_far),
            30.0,
            "the job's first tokens",
        )
        _response, events = await collect_stream(client, "GET", f"/jobs/{late}/stream")
        assert ("state", {"state": "running"}) in events, "connected too late: the job had already finished"
        texts.append((token_text(events), events[-1][1]["result"]["generated_text"]))

    for streamed, generated in texts:
        assert generated
        assert streamed == generated, f"streamed {len(streamed)} chars for a {len(generated)}-char result"


@pytest.mark.usefixtures("quick_job_polls")
async def test_leaving_a_job_stream_does_not_cancel_the_job(make_settings: MakeSettings, app_client: AppClient) -> None:
    async with app_client(make_settings()) as (client, app):
        runner = app.state.textgen.runner
        job_id = await submit_job(client, {"prompt": PROMPT, "max_new_tokens": 80, "ignore_eos": True})
        async with (
            streaming_client(app) as streaming,
            asyncio.timeout(30),
            streaming.stream("GET", f"/jobs/{job_id}/stream") as response,
        ):
            assert response.status_code == 200
            stream = sse_events(response)
            async for name, _data in stream:
                if name == "token":
                    break
            else:
                pytest.fail("the job stream ended without a token event")
            handle = runner.local_handle(job_id)
            assert handle is not None and not handle.done, "the job should still be running"
            await stream.aclose()
        # The stream is gone; the job is not.
        assert not handle.cancel_requested
        view = await poll_job(client, job_id, lambda view: view["state"] in TERMINAL)
    assert view["state"] == "succeeded", view
    assert view["result"]["completion_tokens"] == 80


async def test_a_short_job_is_streamed_live(
    make_settings: MakeSettings, app_client: AppClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jobs_api, "STREAM_POLL_S", 1.5)
    async with app_client(make_settings(job_concurrency=1)) as (client, app):
        blocker = await submit_job(client, {"prompt": PROMPT, "max_new_tokens": 1000, "ignore_eos": True})
        await poll_job(client, blocker, lambda view: view["state"] == "running")
        job_id = await submit_job(client, {"prompt": PROMPT, "max_new_tokens": 4, "ignore_eos": True, "temperature": 0})
        async with (
            streaming_client(app) as streaming,
            asyncio.timeout(30),
            streaming.stream("GET", f"/jobs/{job_id}/stream") as response,
        ):
            stream = sse_events(response)
            first = await anext(stream)
            assert first == ("state", {"state": "queued"})
            assert (await client.delete(f"/jobs/{blocker}")).status_code == 200
            events = [first, *[event async for event in stream]]
    done = events[-1][1]
    assert done["state"] == "succeeded" and done["result"]["generated_text"], done
    assert "token" in names(events), names(events)
    assert token_text(events) == done["result"]["generated_text"]
