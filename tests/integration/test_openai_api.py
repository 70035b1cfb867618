"""Integration tests of the OpenAI-compatible routes: GET /v1/models, POST /v1/completions and
POST /v1/chat/completions, plain and streamed, through HTTP with the app lifespan running.

The tiny model is random, so texts are gibberish; what is checked is the shape, the counts, the order
of streamed chunks, reproducibility (temperature 0 or a seed) and that streamed text equals the
non-streamed text. /v1 has no ignore_eos, so lengths are checked with ``<=``.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI

from models import ChatMessage
from tests.integration.test_streaming import streaming_client, wait_until
from tests.support.app import open_app, tiny_settings
from textgen.services.openai import render_chat_prompt

MakeSettings = Callable[..., Any]
AppClient = Callable[..., Any]
Api = tuple[httpx.AsyncClient, FastAPI]

PROMPT = "The future of AI is"
OTHER_PROMPT = "The quick brown fox"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."}]
FINISH = {"stop", "length"}

_EOL = re.compile(r"\r\n|\r|\n")


# ----- helpers -------------------------------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module")
async def api(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Api]:
    """One app (default settings) for the tests that need nothing special; they run one at a time."""
    folder = tmp_path_factory.mktemp("openai-api")
    async with open_app(tiny_settings(tiny_model_dir, folder)) as (client, app):
        yield client, app


async def data_lines(response: httpx.Response) -> AsyncIterator[str]:
    """The data of each SSE event (split on CR/LF/CRLF only, as the SSE spec says)."""
    buffer = ""
    async for text in response.aiter_text():
        buffer += text
    data: list[str] = []
    for line in _EOL.split(buffer):
        if not line:
            if data:
                yield "\n".join(data)
            data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    if data:
        yield "\n".join(data)


async def stream_chunks(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> tuple[httpx.Response, list[Any]]:
    """POST with stream: true; every data payload decoded, the final "[DONE]" kept as the string."""
    async with client.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200, (await response.aread()).decode()
        assert response.headers["content-type"].startswith("text/event-stream")
        chunks = [item if item == "[DONE]" else json.loads(item) async for item in data_lines(response)]
    assert chunks and chunks[-1] == "[DONE]", chunks[-3:]
    assert "[DONE]" not in chunks[:-1]
    return response, chunks[:-1]


async def post_ok(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = await client.post(path, json=body)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    return dict(response.json())


def assert_openai_error(response: httpx.Response, status: int, kind: str | None = None) -> dict[str, Any]:
    """OpenAI's error body plus the request id: {"error": {message, type, param, code}, "request_id"}."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error", "request_id"}, body
    error = body["error"]
    assert {"message", "type"} <= set(error), error
    assert isinstance(error["message"], str) and error["message"], error
    if kind is not None:
        assert error["type"] == kind, error
    assert body["request_id"] and response.headers["X-Request-ID"] == body["request_id"]
    return dict(error)


def prompt_tokens(app: Any, text: str) -> int:
    return len(app.state.textgen.model.tokenizer(text).input_ids)


def assert_usage_adds_up(usage: dict[str, Any]) -> None:
    assert set(usage) == {"prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details"}, usage
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 0 <= usage["prompt_tokens_details"]["cached_tokens"] < usage["prompt_tokens"]


# ----- /v1/models ----------------------------------------------------------------------------------------


async def test_models_lists_the_served_model(make_settings: MakeSettings, app_client: AppClient) -> None:
    """The served name first, then its aliases (TEXTGEN_MODEL_ALIASES), each a full model card."""
    settings = make_settings(model_name="tiny-test-model", model_aliases="gpt-3.5-turbo,local")
    async with app_client(settings) as (client, app):
        body = (await client.get("/v1/models")).json()
    assert body["object"] == "list"
    assert [card["id"] for card in body["data"]] == ["tiny-test-model", "gpt-3.5-turbo", "local"]
    assert body["data"][0]["id"] == app.state.textgen.model.name
    for card in body["data"]:
        assert card["object"] == "model"
        assert isinstance(card["created"], int) and card["created"] > 0
        assert card["owned_by"]


# ----- /v1/completions -----------------------------------------------------------------------------------


async def test_completion_shape_and_usage(api: Api) -> None:
    client, app = api
    response = await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, "temperature": 0})
    assert response.status_code == 200, response.text
    body = response.json()
    expected_prompt_tokens = prompt_tokens(app, PROMPT)
    model_name = app.state.textgen.model.name
    assert body["object"] == "text_completion"
    assert body["id"].startswith("cmpl-")
    assert body["model"] == model_name
    assert isinstance(body["created"], int)
    assert response.headers["X-Request-ID"]
    [choice] = body["choices"]
    assert choice["index"] == 0
    assert isinstance(choice["text"], str)
    assert choice["logprobs"] is None
    assert choice["finish_reason"] in FINISH
    usage = body["usage"]
    assert_usage_adds_up(usage)
    assert usage["prompt_tokens"] == expected_prompt_tokens
    assert 1 <= usage["completion_tokens"] <= 8
    if choice["finish_reason"] == "length":
        assert usage["completion_tokens"] == 8


async def test_completion_n_and_seed(api: Api) -> None:
    request = {"prompt": PROMPT, "max_tokens": 12, "n": 2, "seed": 1234, "temperature": 1.0}
    client, app = api
    first = await post_ok(client, "/v1/completions", request)
    again = await post_ok(client, "/v1/completions", request)
    other_seed = await post_ok(client, "/v1/completions", {**request, "seed": 999})
    expected_prompt_tokens = prompt_tokens(app, PROMPT)

    assert [c["index"] for c in first["choices"]] == [0, 1]
    assert all(c["finish_reason"] in FINISH for c in first["choices"])
    usage = first["usage"]
    assert_usage_adds_up(usage)
    assert usage["prompt_tokens"] == expected_prompt_tokens  # the prompt is counted once, not per choice
    assert 2 <= usage["completion_tokens"] <= 2 * 12
    # Same seed, same texts; the two choices of one request are sampled differently.
    assert [c["text"] for c in again["choices"]] == [c["text"] for c in first["choices"]]
    assert first["choices"][0]["text"] != first["choices"][1]["text"]
    assert [c["text"] for c in other_seed["choices"]] != [c["text"] for c in first["choices"]]


async def test_completion_list_of_prompts_with_n(api: Api) -> None:
    """Two prompts, n=2: four choices, those of the first prompt first (greedy, so each pair is equal)."""
    greedy = {"max_tokens": 8, "temperature": 0}
    client, app = api
    body = await post_ok(client, "/v1/completions", {"prompt": [PROMPT, OTHER_PROMPT], "n": 2, **greedy})
    single = [
        (await post_ok(client, "/v1/completions", {"prompt": prompt, **greedy}))["choices"][0]["text"]
        for prompt in (PROMPT, OTHER_PROMPT)
    ]
    both_prompts = prompt_tokens(app, PROMPT) + prompt_tokens(app, OTHER_PROMPT)
    assert single[0] != single[1], "the two prompts should continue differently"
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in body["choices"]] == [single[0], single[0], single[1], single[1]]
    assert_usage_adds_up(body["usage"])
    assert body["usage"]["prompt_tokens"] == both_prompts
    assert 4 <= body["usage"]["completion_tokens"] <= 4 * 8


async def test_completion_stop_strings(api: Api) -> None:
    greedy = {"prompt": OTHER_PROMPT, "max_tokens": 30, "temperature": 0}
    client, _app = api
    original = (await post_ok(client, "/v1/completions", greedy))["choices"][0]["text"]
    found = re.search(r"(?<=.)[A-Za-z]{2}", original, flags=re.DOTALL)
    assert found, f"no stop string candidate in {original!r}"
    stop = found.group()
    cut = original.index(stop)
    assert cut > 0
    as_list = await post_ok(client, "/v1/completions", {**greedy, "stop": ["never-produced-zq", stop]})
    as_string = await post_ok(client, "/v1/completions", {**greedy, "stop": stop})
    not_present = await post_ok(client, "/v1/completions", {**greedy, "stop": "never-produced-zq"})

    for body in (as_list, as_string):
        [choice] = body["choices"]
        assert choice["text"] == original[:cut], (original, stop)
        assert choice["finish_reason"] == "stop"
        assert body["usage"]["completion_tokens"] < 30
    assert not_present["choices"][0]["text"] == original


async def test_completion_stream(api: Api) -> None:
    request = {"prompt": PROMPT, "max_tokens": 10, "temperature": 0}
    client, app = api
    plain = await post_ok(client, "/v1/completions", request)
    response, chunks = await stream_chunks(client, "/v1/completions", request)
    model_name = app.state.textgen.model.name

    assert response.headers["X-Request-ID"]
    assert len(chunks) >= 1
    ids = {chunk["id"] for chunk in chunks}
    assert len(ids) == 1 and next(iter(ids)).startswith("cmpl-")
    for chunk in chunks:
        assert chunk["object"] == "text_completion"
        assert chunk["model"] == model_name
        assert "usage" not in chunk or chunk["usage"] is None  # only with include_usage
        [choice] = chunk["choices"]
        assert choice["index"] == 0
    finishes = [chunk["choices"][0]["finish_reason"] for chunk in chunks]
    assert finishes[:-1] == [None] * (len(chunks) - 1), finishes
    assert finishes[-1] == plain["choices"][0]["finish_reason"]
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == plain["choices"][0]["text"]


async def test_completion_stream_with_usage_and_n(api: Api) -> None:
    request = {"prompt": PROMPT, "max_tokens": 6, "n": 2, "seed": 7, "stream_options": {"include_usage": True}}
    client, _app = api
    plain = await post_ok(client, "/v1/completions", {**request, "stream_options": None})
    _response, chunks = await stream_chunks(client, "/v1/completions", request)

    *choice_chunks, usage_chunk = chunks
    assert usage_chunk["choices"] == []
    assert_usage_adds_up(usage_chunk["usage"])
    assert usage_chunk["usage"] == plain["usage"]
    texts = {0: "", 1: ""}
    finished: list[int] = []
    for chunk in choice_chunks:
        [choice] = chunk["choices"]
        assert choice["index"] not in finished, "text after the choice's finish_reason"
        texts[choice["index"]] += choice["text"]
        if choice["finish_reason"] is not None:
            assert choice["finish_reason"] in FINISH
            finished.append(choice["index"])
    assert sorted(finished) == [0, 1]
    assert [texts[0], texts[1]] == [c["text"] for c in plain["choices"]]


async def test_stream_error_after_start_is_an_error_chunk(make_settings: MakeSettings, app_client: AppClient) -> None:
    """A deadline that passes mid-stream cannot change the status: an error chunk, then [DONE].
    (Greedy on PROMPT the tiny model repeats itself and does not stop early.)"""
    async with app_client(make_settings(request_timeout_s=0.05)) as (client, _app):
        response, chunks = await stream_chunks(
            client, "/v1/completions", {"prompt": PROMPT, "max_tokens": 900, "temperature": 0}
        )
    last = chunks[-1]
    assert set(last) == {"error", "request_id"}, last
    assert last["error"]["type"] == "timeout"
    assert last["error"]["message"]
    assert last["request_id"] == response.headers["X-Request-ID"]
    assert all("choices" in chunk for chunk in chunks[:-1])


# ----- /v1/chat/completions ------------------------------------------------------------------------------


async def test_chat_completion_shape_and_usage(api: Api) -> None:
    client, app = api
    body = await post_ok(client, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 12, "temperature": 0})
    rendered = render_chat_prompt(app.state.textgen.model.tokenizer, [ChatMessage(**m) for m in MESSAGES])
    expected_prompt_tokens = prompt_tokens(app, rendered)
    model_name = app.state.textgen.model.name
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == model_name
    [choice] = body["choices"]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in FINISH
    assert_usage_adds_up(body["usage"])
    assert body["usage"]["prompt_tokens"] == expected_prompt_tokens
    assert 1 <= body["usage"]["completion_tokens"] <= 12


async def test_chat_max_completion_tokens_wins(api: Api) -> None:
    client, _app = api
    body = await post_ok(
        client,
        "/v1/chat/completions",
        {"messages": MESSAGES, "max_tokens": 40, "max_completion_tokens": 3, "temperature": 0},
    )
    assert body["usage"]["completion_tokens"] <= 3


async def test_chat_stream_matches_the_plain_answer(api: Api) -> None:
    request = {"messages": MESSAGES, "max_tokens": 12, "temperature": 0}
    client, _app = api
    plain = await post_ok(client, "/v1/chat/completions", request)
    response, chunks = await stream_chunks(client, "/v1/chat/completions", request)

    assert len({chunk["id"] for chunk in chunks}) == 1
    assert chunks[0]["id"].startswith("chatcmpl-")
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    first, *middle, last = chunks
    assert first["choices"][0]["delta"]["role"] == "assistant"
    assert first["choices"][0]["finish_reason"] is None
    for chunk in middle:
        [choice] = chunk["choices"]
        assert set(choice["delta"]) == {"content"}, choice
        assert choice["finish_reason"] is None
    [final] = last["choices"]
    assert final["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert "role" not in final["delta"]
    streamed = (
        first["choices"][0]["delta"].get("content", "")
        + "".join(chunk["choices"][0]["delta"]["content"] for chunk in middle)
        + final["delta"].get("content", "")
    )
    assert streamed == plain["choices"][0]["message"]["content"]
    assert response.headers["X-Request-ID"]


async def test_chat_stream_with_usage(api: Api) -> None:
    request = {"messages": MESSAGES, "max_tokens": 5, "temperature": 0}
    client, _app = api
    plain = await post_ok(client, "/v1/chat/completions", request)
    _response, chunks = await stream_chunks(
        client, "/v1/chat/completions", {**request, "stream_options": {"include_usage": True}}
    )
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == plain["usage"]
    assert chunks[-2]["choices"][0]["finish_reason"] in FINISH


# ----- leniency and validation ---------------------------------------------------------------------------


async def test_neutral_values_and_metadata_are_accepted(api: Api) -> None:
    """Neutral values of honoured fields and metadata fields pass (unknown fields are refused: see
    tests/integration/test_openai_fields.py)."""
    extra = {"logit_bias": {}, "user": "x", "frequency_penalty": 0, "logprobs": None, "model": "tiny"}
    client, _app = api
    completion = await post_ok(client, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2, **extra})
    messages = [{"role": "user", "content": "hi", "name": "alice"}]
    chat = await post_ok(client, "/v1/chat/completions", {"messages": messages, "max_tokens": 2, **extra})
    assert completion["object"] == "text_completion" and len(completion["choices"]) == 1
    assert chat["object"] == "chat.completion" and len(chat["choices"]) == 1


INVALID = [
    pytest.param("/v1/completions", {"prompt": PROMPT, "temperature": 5}, "temperature", id="temperature-5"),
    pytest.param("/v1/completions", {"prompt": PROMPT, "n": 0}, "n", id="n-0"),
    pytest.param("/v1/completions", {"max_tokens": 3}, "prompt", id="missing-prompt"),
    pytest.param("/v1/completions", {"prompt": PROMPT, "max_tokens": 0}, "max_tokens", id="max-tokens-0"),
    pytest.param("/v1/completions", {"prompt": ""}, None, id="empty-prompt"),
    pytest.param("/v1/completions", {"prompt": []}, None, id="empty-prompt-list"),
    pytest.param("/v1/completions", {"prompt": PROMPT, "stop": ["a", "b", "c", "d", "e"]}, None, id="5-stops"),
    pytest.param("/v1/chat/completions", {"messages": []}, "messages", id="no-messages"),
    pytest.param("/v1/chat/completions", {"messages": MESSAGES, "temperature": 5}, "temperature", id="chat-temp-5"),
    pytest.param(
        "/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, None, id="chat-unknown-role"
    ),
    pytest.param(
        "/v1/chat/completions", {"messages": MESSAGES, "stop": ["a", "b", "c", "d", "e"]}, None, id="chat-5-stops"
    ),
]


@pytest.mark.parametrize(("path", "body", "param"), INVALID)
async def test_invalid_requests_are_400_in_openai_shape(
    path: str, body: dict[str, Any], param: str | None, api: Api
) -> None:
    client, app = api
    response = await client.post(path, json=body)
    streamed = await client.post(path, json={**body, "stream": True})
    assert app.state.textgen.engine.stats().running == 0
    error = assert_openai_error(response, 400, "invalid_request_error")
    if param is not None:
        assert error["param"] == param, error
        assert param in error["message"]
    assert_openai_error(streamed, 400, "invalid_request_error")  # errors before streaming are plain JSON


async def test_more_than_four_stops_names_the_limit(api: Api) -> None:
    client, _app = api
    four = await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "stop": list("wxyz")})
    five = await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "stop": list("vwxyz")})
    assert four.status_code == 200, four.text
    assert "4" in assert_openai_error(five, 400, "invalid_request_error")["message"]


async def test_blocked_prompt_or_message_is_400_in_openai_shape(api: Api) -> None:
    client, app = api
    responses = [
        await client.post("/v1/completions", json={"prompt": "I hate this"}),
        await client.post("/v1/completions", json={"prompt": [PROMPT, "so much HATE"], "stream": True}),
        await client.post(
            "/v1/chat/completions", json={"messages": [*MESSAGES, {"role": "user", "content": "I hate you"}]}
        ),
        await client.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "system", "content": "h4te"}, MESSAGES[1]], "stream": True},
        ),
    ]
    stats = app.state.textgen.engine.stats()
    for response in responses:
        error = assert_openai_error(response, 400, "invalid_request_error")
        assert "content filter" in error["message"]
    assert stats.running == stats.waiting_interactive == 0  # nothing was generated


async def test_queue_full_is_503_in_openai_shape(make_settings: MakeSettings, app_client: AppClient) -> None:
    """One slot, no queue, four concurrent requests: one is served, three get 503 with Retry-After."""
    greedy = {"max_tokens": 60, "temperature": 0}
    chat = {"messages": [{"role": "user", "content": PROMPT}], **greedy}
    requests = [
        ("/v1/completions", {"prompt": PROMPT, **greedy}),
        ("/v1/completions", {"prompt": PROMPT, "stream": True, **greedy}),
        ("/v1/chat/completions", chat),
        ("/v1/chat/completions", {**chat, "stream": True}),
    ]
    async with app_client(make_settings(max_running=1, max_waiting=0)) as (client, _app):
        responses = await asyncio.gather(*(client.post(path, json=body) for path, body in requests))
        after = await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200, 503, 503, 503], [r.text[:200] for r in responses]
    for response in responses:
        if response.status_code == 503:
            error = assert_openai_error(response, 503)
            assert "capacity" in error["message"]
            assert response.headers["Retry-After"].isdigit() and int(response.headers["Retry-After"]) >= 1
    assert after.status_code == 200, after.text  # the refused requests held no slot


async def test_leaving_a_stream_cancels_every_choice(api: Api) -> None:
    """The client goes away after the first chunk: both choices (n=2) leave the batch at once.
    (Greedy on PROMPT the tiny model repeats itself and does not stop early.)"""
    _client, app = api
    engine = app.state.textgen.engine
    body = {"prompt": PROMPT, "max_tokens": 900, "n": 2, "temperature": 0, "stream": True}
    async with streaming_client(app) as client, client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                assert json.loads(line[5:])["choices"][0]["text"] is not None
                break
        assert engine.stats().running == 2, "both choices should still be generating"
    await wait_until(lambda: engine.stats().running == 0, 2.0, "both sequences leaving the batch")


async def test_ignore_eos_extension_generates_exactly_max_tokens(
    make_settings: Callable[..., Any], app_client: Callable[..., Any]
) -> None:
    async with app_client(make_settings()) as (client, _app):
        body = {"prompt": "Hi", "max_tokens": 12, "ignore_eos": True, "n": 3, "seed": 1}
        response = await client.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 36
        assert {choice["finish_reason"] for choice in response.json()["choices"]} == {"length"}
