"""The official ``openai`` Python client against a real uvicorn serving the real bundled model, plus a
real client disconnect during a streamed /generate (which httpx's in-process ASGITransport cannot show).

One server for the module; greedy decoding (temperature 0) makes plain and streamed answers comparable.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import openai
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from tests.support.server import MODEL_NAME, Server
from tests.support.waiting import wait_until_sync

pytestmark = [pytest.mark.e2e, pytest.mark.server]

PROMPT = "The capital of France is"
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture(scope="module")
def server(default_server: Server) -> Server:
    """The session's bundled-model server: nothing here runs background jobs or changes a setting."""
    return default_server


@pytest.fixture(scope="module")
def oai(server: Server) -> Iterator[OpenAI]:
    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    try:
        yield client
    finally:
        client.close()


def test_models_list(oai: OpenAI) -> None:
    models = oai.models.list()
    ids = [model.id for model in models.data]
    assert ids[0] == MODEL_NAME and "default" in ids  # the served name first, then its aliases
    assert all(model.object == "model" for model in models.data)


def test_completion_plain_and_streamed(oai: OpenAI) -> None:
    plain = oai.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=0)
    [choice] = plain.choices
    assert plain.object == "text_completion"
    assert plain.model == MODEL_NAME
    assert "paris" in choice.text.lower(), choice.text
    assert choice.finish_reason in ("stop", "length")
    assert plain.usage is not None
    assert 0 < plain.usage.completion_tokens <= 12
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens

    chunks = list(oai.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=0, stream=True))
    assert chunks
    assert len({chunk.id for chunk in chunks}) == 1
    assert "".join(chunk.choices[0].text for chunk in chunks) == choice.text
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason
    assert all(chunk.choices[0].finish_reason is None for chunk in chunks[:-1])


def test_chat_plain_and_streamed(oai: OpenAI) -> None:
    plain = oai.chat.completions.create(model=MODEL_NAME, messages=QUESTION, max_tokens=16, temperature=0)
    [choice] = plain.choices
    assert plain.object == "chat.completion"
    assert choice.message.role == "assistant"
    content = choice.message.content
    assert content and content.strip(), plain
    assert "paris" in content.lower(), content
    assert choice.finish_reason in ("stop", "length")
    assert plain.usage is not None and 0 < plain.usage.completion_tokens <= 16

    stream = oai.chat.completions.create(
        model=MODEL_NAME,
        messages=QUESTION,
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    *with_choices, usage_chunk = chunks
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens == plain.usage.completion_tokens
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in with_choices)
    assert streamed == content
    finishes = [chunk.choices[0].finish_reason for chunk in with_choices if chunk.choices[0].finish_reason]
    assert finishes == [choice.finish_reason]


def test_invalid_request_is_a_bad_request_error(oai: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        oai.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=4, temperature=5)
    assert info.value.status_code == 400
    body = info.value.response.json()
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["param"] == "temperature"
    assert body["request_id"] == info.value.response.headers["x-request-id"]


def running_sequences(client: httpx.Client) -> float:
    response = client.get("/metrics")
    assert response.status_code == 200
    for family in text_string_to_metric_families(response.text):
        if family.name == "textgen_engine_running_sequences":
            return float(family.samples[0].value)
    raise AssertionError("textgen_engine_running_sequences is missing from /metrics")


def test_disconnect_cancels_the_generation(server: Server) -> None:
    """Read one token event of a long stream, drop the connection: the sequence leaves the batch."""
    body = {
        "prompt": "Write a very long story about a dragon.",
        "max_new_tokens": 900,
        "ignore_eos": True,
        "stream": True,
    }
    with server.client() as observer, httpx.Client(base_url=server.url, timeout=60) as streaming:
        # The server is shared: work another module left behind (a background job) ends first.
        wait_until_sync(lambda: running_sequences(observer) == 0, 120.0, "an empty batch before the stream")
        with streaming.stream("POST", "/generate", json=body) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            event = None
            # Keep a reference to the line iterator: a generator dropped by `break` is closed at once, and
            # closing httpx's iterator closes the connection, i.e. the client would already have left.
            lines = response.iter_lines()
            for line in lines:
                if line.startswith("event:"):
                    event = line.removeprefix("event:").strip()
                elif line.startswith("data:") and event == "token":
                    assert json.loads(line.removeprefix("data:"))["text"]
                    break
            else:
                pytest.fail("the stream ended without a token event")
            # Mid-stream: the other ~900 tokens are still to come.
            assert running_sequences(observer) == 1, server.log_tail()
        # Leaving the block closed the connection with the body unread.
        try:
            wait_until_sync(lambda: running_sequences(observer) == 0, 3.0, "the batch emptying", interval_s=0.1)
        except AssertionError:
            pytest.fail(f"{running_sequences(observer)} running 3 s after the client left\n{server.log_tail()}")
