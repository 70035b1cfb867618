"""Tool calls on the real bundled model (SmolLM2-135M-Instruct), default content filter on: 500 of 500
chat completions at temperature 1 with tool_choice required or a named function give calls whose
arguments parse and validate against the function's schema (jsonschema), or end with finish_reason
content_filter and no call; an auto request answers in one of the two forms; with parallel calls
allowed, every call of an answer validates and the answer ends.

The schemas are what agent frameworks send (Pydantic models with ``max_length`` on free text). The
bounds matter at temperature 1: the grammar guarantees that what is written is valid, not that the
model ever closes a string, and a 135M model sampling from the whole distribution can ramble inside an
unbounded string past any budget (measured: 2 of 100 answers without the bounds). Numbers need nothing
of the client: the server writes open numbers with at most six decimals (``textgen.services.tools``).

In-process (the app's lifespan over ASGITransport, the full route, service and engine path), the
requests sent 100 at a time so they share decode batches: about three minutes on a 2-core CPU.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import pytest_asyncio

from tests.support.app import open_app
from textgen.config import load_settings
from textgen.services.tools import MAX_PARALLEL_CALLS

pytestmark = pytest.mark.e2e

logger = logging.getLogger(__name__)

CALLS = 500
AT_ONCE = 100
SCHEMAS: dict[str, dict[str, Any]] = {
    "get_weather": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "description": "City name", "maxLength": 40},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
    "search_web": {
        "type": "object",
        "properties": {
            "query": {"type": "string", "maxLength": 80},
            "max_results": {"type": "integer", "minimum": 1, "maximum": 20},
            "safe": {"type": "boolean"},
        },
        "required": ["query"],
        "additionalProperties": False,
    },
    "create_event": {
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 60},
            "day": {"type": "string", "enum": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]},
            "attendees": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 4},
            "duration_hours": {"type": "number", "minimum": 0.25, "maximum": 12},
        },
        "required": ["title", "day"],
        "additionalProperties": False,
    },
}
DESCRIPTIONS = {
    "get_weather": "Get the current weather in a city.",
    "search_web": "Search the web.",
    "create_event": "Add an event to the calendar.",
}
TOOLS = [
    {"type": "function", "function": {"name": name, "description": DESCRIPTIONS[name], "parameters": schema}}
    for name, schema in SCHEMAS.items()
]
QUESTIONS = [
    "What's the weather like in Lisbon today?",
    "Find me recent news about solar panels.",
    "Put a team lunch with Ana and Bo on my calendar for Friday.",
    "Is it going to rain in Tokyo?",
    "Look up the population of Canada.",
]


@pytest_asyncio.fixture(scope="module")
async def bundled(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[httpx.AsyncClient]:
    folder: Path = tmp_path_factory.mktemp("tools-bundled")
    settings = load_settings(
        model="bundled",
        job_store=f"sqlite:///{folder / 'jobs.db'}",
        max_running=AT_ONCE,
        max_waiting=AT_ONCE,
        rate_limit_rpm=0,
        rate_limit_tpm=0,
        # The default content filter stays on: it used to redact a blocked word inside an argument as
        # "[redacted]", which pushed a string past its maxLength (once in 500: a search query); a
        # structured row now ends at the match with finish_reason content_filter, and no call it returns
        # is ever rewritten.
    )
    async with open_app(settings) as (client, _app):
        client.timeout = httpx.Timeout(600)
        yield client


def request_body(number: int, parallel: bool = False) -> dict[str, Any]:
    """Even numbers: tool_choice required; odd: each function named in turn."""
    choice: Any = "required"
    if number % 2:
        choice = {"type": "function", "function": {"name": list(SCHEMAS)[number // 2 % len(SCHEMAS)]}}
    return {
        "messages": [{"role": "user", "content": QUESTIONS[number % len(QUESTIONS)]}],
        "tools": TOOLS,
        "tool_choice": choice,
        "temperature": 1.0,
        "seed": number,  # reproducible, and different for every request
        "max_tokens": 600,
        "parallel_tool_calls": parallel,
    }


# 500 generations of ~30 tokens after ~330-token prompts on the shared 2-core machine: 180 s at a load
# average of 2-5, 470 s at 8 (measured), so this test gets more than the suite's default 300 s.
@pytest.mark.timeout(900)
async def test_500_of_500_forced_calls_validate_on_the_bundled_model(bundled: httpx.AsyncClient) -> None:
    """With the default content filter on: every answer is a call whose arguments validate, or (when the
    model wrote a blocked word into an argument) ends with finish_reason content_filter and carries no
    call, never a call with "[redacted]" in it."""
    failures: list[str] = []
    names: Counter[str] = Counter()
    filtered: list[str] = []

    async def one(number: int) -> None:
        body = request_body(number)
        response = await bundled.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        [choice] = response.json()["choices"]
        calls = choice["message"].get("tool_calls") or []
        if "[redacted]" in response.text:
            failures.append(f"#{number}: redacted {choice}"[:400])
        if choice["finish_reason"] == "content_filter" and not calls:
            filtered.append(f"#{number}: {choice['message']}"[:200])
            return
        if choice["finish_reason"] != "tool_calls" or not calls:
            failures.append(f"#{number}: {choice['finish_reason']} {choice['message']}"[:400])
            return
        for call in calls:
            name = call["function"]["name"]
            names[name] += 1
            if isinstance(body["tool_choice"], dict) and name != body["tool_choice"]["function"]["name"]:
                failures.append(f"#{number}: called {name}, asked for {body['tool_choice']}")
            try:
                jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[name])
            except (ValueError, jsonschema.ValidationError) as error:
                failures.append(f"#{number}: {name} {call['function']['arguments']!r}: {error}"[:400])

    for start in range(0, CALLS, AT_ONCE):
        await asyncio.gather(*(one(number) for number in range(start, min(start + AT_ONCE, CALLS))))
    logger.info("Calls per function: %s; ended by the content filter: %s", dict(names), filtered)
    assert not failures, f"{len(failures)} of {CALLS} failed:\n" + "\n".join(failures[:10])
    assert len(filtered) <= CALLS // 100, filtered  # a rare event (1 in 500 measured), not the filter misfiring
    assert set(names) == set(SCHEMAS)


async def test_parallel_answers_end_and_every_call_validates(bundled: httpx.AsyncClient) -> None:
    """Up to MAX_PARALLEL_CALLS calls per answer: the grammar ends the answer there, so nearly every answer
    ends by itself within 1,024 tokens (8 long calls can still outrun it); every call returned validates."""

    async def one(number: int) -> tuple[str, list[str]]:
        body = {**request_body(number, parallel=True), "max_tokens": 1024}
        response = await bundled.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        [choice] = response.json()["choices"]
        calls = choice["message"].get("tool_calls") or []
        # content_filter: the calls completed before a blocked word come back (possibly none).
        assert (1 if choice["finish_reason"] != "content_filter" else 0) <= len(calls) <= MAX_PARALLEL_CALLS
        assert "[redacted]" not in response.text
        for call in calls:
            jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[call["function"]["name"]])
        return choice["finish_reason"], [call["id"] for call in calls]

    answers = await asyncio.gather(*(one(number) for number in range(20)))
    finishes = Counter(finish for finish, _ in answers)
    assert set(finishes) <= {"tool_calls", "length", "content_filter"} and finishes["tool_calls"] >= 18, finishes
    ids = [i for _, batch in answers for i in batch]
    assert len(ids) == len(set(ids)) >= 20


async def test_auto_answers_in_text_or_with_a_valid_call(bundled: httpx.AsyncClient) -> None:
    kinds: Counter[str] = Counter()

    # The six requests share decode batches (one after another they took ~21 s of the suite's time).
    async def one(number: int) -> None:
        body = {**request_body(number), "tool_choice": "auto", "max_tokens": 200}
        response = await bundled.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        [choice] = response.json()["choices"]
        message = choice["message"]
        if message.get("tool_calls"):
            kinds["call"] += 1
            for call in message["tool_calls"]:
                jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[call["function"]["name"]])
        else:
            kinds["text"] += 1
            assert "<tool_call>" not in (message["content"] or "")

    await asyncio.gather(*(one(number) for number in range(6)))
    assert sum(kinds.values()) == 6
