"""Issue 20: prompts are checked for length before the content filter on every route, the filter runs
off the event loop, streamed logprobs never spell out a redacted word, and n × logprobs is bounded.

The off-loop proof waits on events, not on time: a filter that holds until released shows /health
answering while a completion sits in the filter.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import pytest

from models import CompletionRequest
from tests.integration.test_openai_api import assert_openai_error, stream_chunks
from textgen.content_filter import ContentFilter, FilterMatch
from textgen.engine.types import Priority
from textgen.errors import PromptTooLongError
from textgen.services.openai import submit_completion

MakeSettings = Callable[..., Any]
AppClient = Callable[..., Any]

ONE_MB_PROMPT = "hate " * 200_000  # 1,000,000 characters, under the 1 MiB body limit
FORCED_HATE = {
    "type": "json_schema",
    "json_schema": {"name": "s", "schema": {"type": "string", "enum": ["I hate rain"]}},
}


class RecordingFilter(ContentFilter):
    """The default filter, recording the length of every text it is asked about."""

    def __init__(self) -> None:
        super().__init__(["hate"])
        self.calls: list[int] = []

    def find(self, text: str) -> list[FilterMatch]:
        self.calls.append(len(text))
        return super().find(text)


class HoldingFilter(ContentFilter):
    """Holds every ``find`` until ``release`` is set (10 s at most, so a filter on the loop fails the test
    instead of hanging it)."""

    def __init__(self) -> None:
        super().__init__([])
        self.entered = threading.Event()
        self.release = threading.Event()
        self.timed_out = False

    def find(self, text: str) -> list[FilterMatch]:
        self.entered.set()
        if not self.release.wait(10):
            self.timed_out = True  # on the event loop, nothing else could run to release it
        return []


async def test_health_answers_while_the_filter_runs(make_settings: MakeSettings, app_client: AppClient) -> None:
    async with app_client(make_settings()) as (client, app):
        holding = HoldingFilter()
        app.state.textgen.service.content_filter = holding
        completion = asyncio.create_task(client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2}))
        try:
            assert await asyncio.to_thread(holding.entered.wait, 10)
            health = await asyncio.wait_for(client.get("/health"), 10)
            assert health.status_code == 200
            assert not completion.done()  # still held in the filter: /health did not wait for it
        finally:
            holding.release.set()
        assert (await completion).status_code == 200
        assert not holding.timed_out


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"prompt": ONE_MB_PROMPT, "max_tokens": 1}),
        ("/v1/completions", {"prompt": ["Hello", ONE_MB_PROMPT], "max_tokens": 1}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": ONE_MB_PROMPT}]}),
    ],
)
async def test_a_1mb_prompt_is_refused_for_length_before_any_work(
    make_settings: MakeSettings, app_client: AppClient, path: str, body: dict[str, Any]
) -> None:
    async with app_client(make_settings()) as (client, app):
        recording = RecordingFilter()
        app.state.textgen.service.content_filter = recording
        error = assert_openai_error(await client.post(path, json=body), 400)
        assert "1000000 characters" in error["message"] and "TEXTGEN_MAX_PROMPT_TOKENS" in error["message"]
        assert recording.calls == []  # neither filtered nor tokenized: refused on its size alone
        assert (await client.get("/health")).status_code == 200


async def test_prompt_tokens_are_counted_before_the_filter_on_every_route(
    make_settings: MakeSettings, app_client: AppClient
) -> None:
    long_prompt = "I hate rain. " * 20  # 260 characters (under 32 per token), about 160 tokens
    async with app_client(make_settings(max_prompt_tokens=40)) as (client, app):
        recording = RecordingFilter()
        service = app.state.textgen.service
        service.content_filter = recording
        generate = await client.post("/generate", json={"prompt": long_prompt})
        assert generate.status_code == 400 and "tokens" in generate.json()["detail"]
        background = await client.post("/generate_background", json={"prompt": long_prompt})
        assert background.status_code == 400 and "at most 40" in background.json()["detail"]
        completion = assert_openai_error(await client.post("/v1/completions", json={"prompt": long_prompt}), 400)
        assert "at most 40" in completion["message"]
        chat_body = {"messages": [{"role": "user", "content": long_prompt}]}
        chat = assert_openai_error(await client.post("/v1/chat/completions", json=chat_body), 400)
        assert "at most 40" in chat["message"]
        with pytest.raises(PromptTooLongError):  # what a batch line runs
            await submit_completion(service, CompletionRequest(prompt=long_prompt), "line-1", Priority.BACKGROUND, None)
        assert recording.calls == []
        # A prompt within the limit still goes through the filter (and is rejected for its content).
        short = await client.post("/generate", json={"prompt": "I hate rain."})
        assert short.status_code == 400 and "content filter" in short.json()["detail"]
        assert recording.calls


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/completions", {"prompt": "Hello", "n": 16, "logprobs": 20, "max_tokens": 100}, "logprobs"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "Hi"}], "n": 16, "logprobs": True, "top_logprobs": 20},
            "top_logprobs",
        ),
    ],
)
async def test_n_times_logprobs_is_bounded(
    make_settings: MakeSettings, app_client: AppClient, path: str, body: dict[str, Any], field: str
) -> None:
    async with app_client(make_settings()) as (client, _):
        error = assert_openai_error(await client.post(path, json=body), 400)
        assert error["message"].startswith(f"{field}:") and "TEXTGEN_MAX_LOGPROBS_PER_REQUEST" in error["message"]
        generate = await client.post("/generate", json={"prompt": "Hello", "logprobs": 20, "max_new_tokens": 4096})
        assert generate.status_code == 400 and generate.json()["detail"].startswith("logprobs:")
        modest = await client.post("/v1/completions", json={"prompt": "Hello", "n": 2, "logprobs": 5, "max_tokens": 4})
        assert modest.status_code == 200, modest.text


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"prompt": "Say it", "logprobs": 2}),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "Say it"}], "logprobs": True, "top_logprobs": 2},
        ),
    ],
)
async def test_streamed_logprobs_do_not_spell_out_a_redacted_word(
    make_settings: MakeSettings, app_client: AppClient, path: str, body: dict[str, Any]
) -> None:
    """The tiny tokenizer writes "hate" as "h", "at", "e": each token alone passes the filter, together
    they spell the blocked word. The row is structured (response_format), so it ends just before the word
    with finish_reason content_filter (a [redacted] could break its schema), and no entry spells it out."""
    async with app_client(make_settings()) as (client, _):
        request = {**body, "response_format": FORCED_HATE, "max_tokens": 30, "seed": 1}
        _, chunks = await stream_chunks(client, path, request)
    text, tokens, alternatives, finishes = "", [], [], []
    for chunk in chunks:
        for choice in chunk["choices"]:
            text += choice.get("text") or (choice.get("delta") or {}).get("content") or ""
            finishes += [choice["finish_reason"]] if choice.get("finish_reason") else []
            logprobs = choice.get("logprobs") or {}
            if "tokens" in logprobs:  # legacy completions
                tokens += logprobs["tokens"]
                alternatives += [token for top in logprobs["top_logprobs"] for token in top]
            for entry in logprobs.get("content") or []:  # chat
                tokens.append(entry["token"])
                alternatives += [top["token"] for top in entry["top_logprobs"]]
    assert text == '"I ' and finishes == ["content_filter"]
    assert tokens and tokens[0] == '"'  # entries before the word are still sent
    assert "h" not in tokens and "at" not in tokens
    assert "hate" not in "".join(tokens) and not ContentFilter(["hate"]).find("".join(tokens))
    assert all("hate" not in token for token in alternatives)
