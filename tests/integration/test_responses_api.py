"""/v1/responses through the official ``openai`` client (over ASGITransport, the app's lifespan running)
and raw HTTP: create, stream, retrieve, delete, previous_response_id, background + cancel, per-tenant
storage on the SQLite and the Redis job store, a stored response surviving a restart, and every field
honoured, refused or ignored as documented.

The tiny model is random: what is checked is the shape, the event sequence, that a response is exactly
the chat completion of the same conversation at temperature 0 (it runs on the chat path), and storage.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
import pytest_asyncio
from fastapi import FastAPI

from tests.integration.test_jobs import LONG_JOB, poll_job, submit
from tests.support.app import open_app, tiny_settings
from tests.support.redis import RedisServer
from tests.support.tiny_model import build_tokenizer
from tests.support.tools import TIME, WEATHER
from tests.support.waiting import wait_until
from textgen.services.openai import render_chat_prompt
from textgen.services.requests import ChatMessage

MakeSettings = Callable[..., Any]
Api = tuple[httpx.AsyncClient, FastAPI]

ALICE = {"Authorization": "Bearer alice-key"}
BOB = {"Authorization": "Bearer bob-key"}
ADMIN = {"Authorization": "Bearer admin-key"}
GREEDY: dict[str, Any] = {"temperature": 0, "max_output_tokens": 8}
STORY = {"role": "user", "content": "Tell me a story."}
ANSWER = {"type": "string", "enum": ["yes", "no"]}


def sdk(client: httpx.AsyncClient, key: str = "unused") -> openai.AsyncOpenAI:
    """The official client on the in-process app (no retries: a 4xx/5xx must show as itself)."""
    return openai.AsyncOpenAI(api_key=key, base_url="http://testserver/v1", http_client=client, max_retries=0)


def served(app: FastAPI) -> str:
    """The served model's name (what /v1/models lists)."""
    return str(app.state.textgen.model.name)


@pytest_asyncio.fixture(scope="module")
async def api(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Api]:
    folder = tmp_path_factory.mktemp("responses-api")
    async with open_app(tiny_settings(tiny_model_dir, folder)) as (client, app):
        yield client, app


async def chat_text(client: httpx.AsyncClient, messages: list[dict[str, Any]], max_tokens: int = 8) -> str:
    body = {"messages": messages, "temperature": 0, "max_tokens": max_tokens}
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["message"]["content"])


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    return error


# ----- create, retrieve, delete ----------------------------------------------------------------------


async def test_create_is_the_chat_completion_of_the_same_conversation(api: Api) -> None:
    client, app = api
    oai = sdk(client)
    ask = {"input": "Tell me a story.", "instructions": "Be brief.", **GREEDY}
    created = await oai.responses.create(model=served(app), **ask)
    assert created.object == "response" and created.id.startswith("resp_")
    assert created.status in ("completed", "incomplete") and created.error is None
    (message,) = created.output
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert message.content[0].type == "output_text"
    expected = await chat_text(client, [{"role": "system", "content": "Be brief."}, STORY])
    assert created.output_text == expected
    assert created.usage is not None
    assert created.usage.total_tokens == created.usage.input_tokens + created.usage.output_tokens
    assert 0 < created.usage.output_tokens <= 8
    assert created.instructions == "Be brief." and created.temperature == 0 and created.max_output_tokens == 8
    if created.status == "incomplete":
        assert created.incomplete_details is not None and created.incomplete_details.reason == "max_output_tokens"

    retrieved = await oai.responses.retrieve(created.id)
    assert retrieved.model_dump() == created.model_dump()

    await oai.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        await oai.responses.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        await oai.responses.delete(created.id)


async def test_items_and_content_parts_become_chat_messages(api: Api) -> None:
    client, _app = api
    items = [
        {"role": "developer", "content": [{"type": "input_text", "text": "Answer in English."}]},
        {"type": "message", "role": "user", "content": "Hello"},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Hi there."}]},
        {"role": "user", "content": [{"type": "input_text", "text": "Tell"}, {"type": "input_text", "text": "more"}]},
    ]
    created = await sdk(client).responses.create(input=items, store=False, **GREEDY)  # type: ignore[arg-type]
    messages = [
        {"role": "developer", "content": "Answer in English."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi there."},
        {"role": "user", "content": "Tell\nmore"},  # text parts are joined with newlines
    ]
    assert created.output_text == await chat_text(client, messages)
    assert created.store is False
    with pytest.raises(openai.NotFoundError):  # store: false keeps nothing
        await sdk(client).responses.retrieve(created.id)


async def test_previous_response_id_continues_the_conversation(api: Api) -> None:
    client, _app = api
    oai = sdk(client)
    first = await oai.responses.create(input="Name a colour.", instructions="Be brief.", **GREEDY)
    second = await oai.responses.create(input="And another?", previous_response_id=first.id, **GREEDY)
    assert second.previous_response_id == first.id and second.instructions is None  # not carried over
    conversation = [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "And another?"},
    ]
    assert second.output_text == await chat_text(client, conversation)
    third = await oai.responses.create(input="One more.", previous_response_id=second.id, **GREEDY)
    conversation += [{"role": "assistant", "content": second.output_text}, {"role": "user", "content": "One more."}]
    assert third.output_text == await chat_text(client, conversation)

    unstored = await oai.responses.create(input="x", store=False, **GREEDY)
    for missing in (unstored.id, "resp_" + "0" * 32, "not-an-id"):
        with pytest.raises(openai.NotFoundError, match="previous_response_id"):
            await oai.responses.create(input="y", previous_response_id=missing, **GREEDY)


# ----- streaming ---------------------------------------------------------------------------------------


async def test_stream_sends_the_responses_event_sequence(api: Api) -> None:
    client, app = api
    oai = sdk(client)
    # A constrained answer ends by itself (status completed), so the client's helper has its final response.
    text: Any = {"format": {"type": "json_schema", "name": "answer", "schema": ANSWER, "strict": True}}
    ask = {"input": "Yes or no?", "text": text, "temperature": 0, "max_output_tokens": 20}
    async with oai.responses.stream(model=served(app), **ask) as stream:
        events = [event async for event in stream]
        final = await stream.get_final_response()
    kinds = [event.type for event in events]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert kinds[:5] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
    ]
    closing = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert kinds[-4:] == [*closing, "response.completed"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    deltas = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert json.loads(deltas) in ("yes", "no")
    assert deltas == final.output_text and final.status == "completed"
    assert events[0].response.status == "in_progress" and events[0].response.id == final.id  # type: ignore[union-attr]
    assert final.usage is not None and final.usage.output_tokens > 0
    stored = await oai.responses.retrieve(final.id)  # stored as streamed
    assert stored.output_text == final.output_text and stored.usage == final.usage and stored.status == final.status
    assert [item.id for item in stored.output] == [item.id for item in final.output]

    plain = await oai.responses.create(**ask)
    assert plain.output_text == final.output_text and plain.usage == final.usage
    assert [(item.type, item.status) for item in plain.output] == [(item.type, item.status) for item in final.output]


async def test_a_stream_cut_by_max_output_tokens_ends_incomplete(api: Api) -> None:
    client, _app = api
    stream = await sdk(client).responses.create(input="Tell me a story.", stream=True, **GREEDY)
    events = [event async for event in stream]
    last = events[-1]
    assert last.type == "response.incomplete"
    assert last.response.incomplete_details is not None
    assert last.response.incomplete_details.reason == "max_output_tokens"
    deltas = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert deltas == last.response.output_text == await chat_text(client, [STORY])
    assert last.response.usage is not None and last.response.usage.output_tokens == 8


async def test_raw_stream_is_named_events_without_done(api: Api) -> None:
    client, _app = api
    body = {"input": "Hi", "stream": True, "store": False, **GREEDY}
    async with client.stream("POST", "/v1/responses", json=body) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        text = (await response.aread()).decode()
    blocks = [block for block in text.replace("\r\n", "\n").split("\n\n") if block.strip()]
    for block in blocks:
        fields = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":"))
        assert json.loads(fields["data"])["type"] == fields["event"]
    assert "[DONE]" not in text


# ----- background jobs ---------------------------------------------------------------------------------


async def test_background_runs_as_a_job_and_cancels(make_settings: MakeSettings) -> None:
    async with open_app(make_settings(job_concurrency=1)) as (client, _app):
        oai = sdk(client)
        queued_behind = await oai.responses.create(input="Tell me a story.", background=True, **GREEDY)
        assert queued_behind.status == "queued" and queued_behind.background is True and queued_behind.output == []

        async def completed() -> bool:
            return (await oai.responses.retrieve(queued_behind.id)).status in ("completed", "incomplete")

        await wait_until(completed, 30, "the background response")
        done = await oai.responses.retrieve(queued_behind.id)
        assert done.output_text == await chat_text(client, [STORY])
        assert (await oai.responses.cancel(done.id)).status == done.status  # ended: returned as it is

        # One runner slot, held by a long job: the next background response waits in the queue.
        blocker = await submit(client, LONG_JOB)
        await poll_job(client, blocker["job_id"], until=lambda view: view["state"] == "running")
        waiting = await oai.responses.create(input="Hello", background=True, **GREEDY)
        assert (await oai.responses.retrieve(waiting.id)).status == "queued"
        cancelled = await oai.responses.cancel(waiting.id)
        assert cancelled.status == "cancelled" and cancelled.id == waiting.id
        assert (await oai.responses.retrieve(waiting.id)).status == "cancelled"
        with pytest.raises(openai.BadRequestError, match="previous_response_id"):
            await oai.responses.create(input="x", previous_response_id=waiting.id, **GREEDY)

        deleted_while_queued = await oai.responses.create(input="Hello", background=True, **GREEDY)
        await oai.responses.delete(deleted_while_queued.id)  # cancelled first, then deleted
        with pytest.raises(openai.NotFoundError):
            await oai.responses.retrieve(deleted_while_queued.id)
        assert (await client.delete(f"/jobs/{blocker['job_id']}")).status_code == 200

        plain = await oai.responses.create(input="Hi", **GREEDY)
        with pytest.raises(openai.BadRequestError, match="Only background responses"):
            await oai.responses.cancel(plain.id)
        for refused in ({"store": False}, {"stream": True}):
            response = await client.post("/v1/responses", json={"input": "x", "background": True, **refused})
            assert "background" in error_of(response, 400)["message"] or "stream" in response.json()["error"]["message"]


# ----- tenants, both stores, restarts ------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "redis"])
def job_store(request: pytest.FixtureRequest) -> Iterator[str | None]:
    if request.param == "sqlite":
        yield None
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    yield server.url(0)
    import redis

    with redis.Redis.from_url(server.url(0)) as raw:
        raw.flushdb()


async def test_stored_responses_belong_to_their_tenant(job_store: str | None, make_settings: MakeSettings) -> None:
    extra = {"job_store": job_store} if job_store else {}
    settings = make_settings(api_keys=["alice-key", "bob-key"], admin_api_keys=["admin-key"], **extra)
    async with open_app(settings) as (client, _app):
        alice, bob, admin = sdk(client, "alice-key"), sdk(client, "bob-key"), sdk(client, "admin-key")
        mine = await alice.responses.create(input="Hello", **GREEDY)
        background = await alice.responses.create(input="Hello", background=True, **GREEDY)
        for response_id in (mine.id, background.id):
            with pytest.raises(openai.NotFoundError):
                await bob.responses.retrieve(response_id)
            with pytest.raises(openai.NotFoundError):
                await bob.responses.delete(response_id)
            with pytest.raises(openai.NotFoundError):
                await bob.responses.cancel(response_id)
            with pytest.raises(openai.NotFoundError):
                await bob.responses.create(input="x", previous_response_id=response_id, **GREEDY)
        assert (await alice.responses.retrieve(mine.id)).output_text == mine.output_text
        assert (await admin.responses.retrieve(mine.id)).id == mine.id  # admins see every tenant's
        continued = await alice.responses.create(input="More", previous_response_id=mine.id, **GREEDY)
        assert continued.previous_response_id == mine.id
        await alice.responses.delete(mine.id)
        with pytest.raises(openai.NotFoundError):
            await alice.responses.retrieve(mine.id)
        assert (await alice.responses.retrieve(continued.id)).id == continued.id  # deleting one keeps the others


async def test_a_stored_response_survives_a_restart(make_settings: MakeSettings) -> None:
    settings = make_settings()  # the same SQLite file both times
    async with open_app(settings) as (client, _app):
        created = await sdk(client).responses.create(input="Remember me.", **GREEDY)
    async with open_app(settings) as (client, _app):
        oai = sdk(client)
        assert (await oai.responses.retrieve(created.id)).model_dump() == created.model_dump()
        continued = await oai.responses.create(input="Go on.", previous_response_id=created.id, **GREEDY)
        conversation = [
            {"role": "user", "content": "Remember me."},
            {"role": "assistant", "content": created.output_text},
            {"role": "user", "content": "Go on."},
        ]
        assert continued.output_text == await chat_text(client, conversation)


# ----- fields: honoured, refused, ignored as metadata ------------------------------------------------


async def test_json_schema_format_constrains_the_output(api: Api) -> None:
    client, _app = api
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 5}},
        "required": ["name"],
        "additionalProperties": False,
    }
    text = {"format": {"type": "json_schema", "name": "person", "schema": schema, "strict": True}}
    created = await sdk(client).responses.create(input="A name", text=text, temperature=1, max_output_tokens=60)  # type: ignore[arg-type]
    assert created.status == "completed", created
    parsed = json.loads(created.output_text)
    assert set(parsed) == {"name"} and isinstance(parsed["name"], str) and len(parsed["name"]) <= 5
    assert created.text is not None and created.text.format.type == "json_schema"


async def test_max_output_tokens_and_metadata(api: Api) -> None:
    client, _app = api
    created = await sdk(client).responses.create(
        input="Tell me a long story.",
        max_output_tokens=1,
        metadata={"trace": "abc"},
        user="u-1",
        safety_identifier="s-1",
        prompt_cache_key="k",
        service_tier="auto",
        store=False,
    )
    assert created.usage is not None and created.usage.output_tokens == 1
    assert created.status == "incomplete" and created.output[0].status == "incomplete"  # type: ignore[union-attr]
    assert created.metadata == {"trace": "abc"} and created.user == "u-1"


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"frobnicate": 1}, "frobnicate"),
        ({"reasoning": {"effort": "high"}}, "reasoning"),
        ({"include": ["message.output_text.logprobs"]}, "include"),
        ({"truncation": "auto"}, "truncation"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"text": {"format": {"type": "grammar"}}}, "text.format.type"),
        ({"tools": [{"type": "web_search"}]}, "tools"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]}, "text only"),
        ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0].type"),
        ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
        ({"stream_options": {"include_obfuscation": False}}, "stream_options"),
        ({"temperature": 3}, "temperature"),
        ({"input": ""}, "input"),
    ],
)
async def test_fields_it_cannot_honour_are_refused_by_name(api: Api, body: dict[str, Any], named: str) -> None:
    client, _app = api
    response = await client.post("/v1/responses", json={"input": "Hi", **body})
    error = error_of(response, 400)
    assert named in error["message"], error
    assert error["type"] == "invalid_request_error"


async def test_refused_fields_that_ask_for_nothing_are_accepted(api: Api) -> None:
    client, _app = api
    body = {
        "input": "Hi",
        "include": [],
        "reasoning": None,
        "truncation": "disabled",
        "top_logprobs": 0,
        "max_tool_calls": None,
        "store": False,
        **GREEDY,
    }
    response = await client.post("/v1/responses", json=body)
    assert response.status_code == 200, response.text


async def test_unknown_ids_are_404_in_openais_shape(api: Api) -> None:
    client, _app = api
    for path in ("/v1/responses/resp_" + "0" * 32, "/v1/responses/whatever"):
        assert error_of(await client.get(path), 404)["type"] == "invalid_request_error"  # OpenAI types its 404s so
        error_of(await client.delete(path), 404)
        error_of(await client.post(path + "/cancel"), 404)


# ----- tools (the chat path's tool calling, in the Responses shapes) -----------------------------------

TOOLS: list[Any] = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "Weather in a city.",
        "parameters": WEATHER,
        "strict": True,
    },
    {"type": "function", "name": "get_time", "description": "Time in a zone.", "parameters": TIME, "strict": True},
]
CHAT_TOOLS = [{"type": "function", "function": {k: v for k, v in tool.items() if k != "type"}} for tool in TOOLS]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}


def function_calls(response: Any) -> list[Any]:
    return [item for item in response.output if item.type == "function_call"]


async def test_required_and_named_tool_choice_give_valid_function_calls(api: Api) -> None:
    client, _app = api
    oai = sdk(client)
    for seed_text in ("Weather in Paris?", "What time is it?", "Hello"):
        created = await oai.responses.create(
            input=seed_text, tools=TOOLS, tool_choice="required", temperature=1, max_output_tokens=200
        )
        calls = function_calls(created)
        assert calls and len(calls) == len(created.output), created.output
        for call in calls:
            assert call.call_id and call.id.startswith("fc_") and call.status == "completed"
            jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
    named = await oai.responses.create(
        input="Hi",
        tools=TOOLS,
        tool_choice={"type": "function", "name": "get_time"},
        parallel_tool_calls=False,
        temperature=1,
        max_output_tokens=200,
    )
    (call,) = function_calls(named)
    assert call.name == "get_time"
    jsonschema.validate(json.loads(call.arguments), TIME)
    assert named.tool_choice.type == "function" and named.parallel_tool_calls is False  # type: ignore[union-attr]


async def test_function_call_items_round_trip_as_the_chat_conversation(api: Api) -> None:
    client, _app = api
    oai = sdk(client)
    first = await oai.responses.create(
        input="Weather in Paris?",
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,  # one call: the conversation stays well inside the tiny model's context
        temperature=0,
        max_output_tokens=200,
    )
    calls = function_calls(first)
    outputs = [{"type": "function_call_output", "call_id": c.call_id, "output": "18 degrees"} for c in calls]
    second = await oai.responses.create(
        input=outputs,  # type: ignore[arg-type]
        previous_response_id=first.id,
        tools=TOOLS,
        temperature=0,
        max_output_tokens=30,
    )
    # The same conversation as a chat: the user, the assistant's tool_calls (null content), tool messages.
    tool_calls = [
        {"id": c.call_id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls
    ]
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": tool_calls},
        *({"role": "tool", "tool_call_id": c.call_id, "content": "18 degrees"} for c in calls),
    ]
    body = {"messages": messages, "tools": CHAT_TOOLS, "temperature": 0, "max_tokens": 30}
    chat = (await client.post("/v1/chat/completions", json=body)).json()["choices"][0]["message"]
    assert (chat["content"] or "") == "".join(
        part.text
        for item in second.output
        if item.type == "message"
        for part in item.content  # type: ignore[union-attr]
    )
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in chat.get("tool_calls") or []] == [
        (c.name, c.arguments) for c in function_calls(second)
    ]

    # The same items sent in full (no previous_response_id) give the same answer.
    items = [
        {"role": "user", "content": "Weather in Paris?"},
        *({"type": "function_call", "call_id": c.call_id, "name": c.name, "arguments": c.arguments} for c in calls),
        *outputs,
    ]
    again = await oai.responses.create(input=items, tools=TOOLS, temperature=0, max_output_tokens=30, store=False)  # type: ignore[arg-type]
    assert [item.model_dump(exclude={"id", "call_id"}) for item in again.output] == [
        item.model_dump(exclude={"id", "call_id"}) for item in second.output
    ]


async def test_streamed_function_calls(api: Api) -> None:
    client, app = api
    async with sdk(client).responses.stream(
        model=served(app),
        input="Weather in Paris?",
        tools=TOOLS,
        tool_choice={"type": "function", "name": "get_weather"},
        parallel_tool_calls=False,
        temperature=1,
        max_output_tokens=200,
    ) as stream:
        events = [event async for event in stream]
        final = await stream.get_final_response()
    kinds = [event.type for event in events]
    (call,) = function_calls(final)
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert events[2].item.type == "function_call" and events[2].item.name == "get_weather"  # type: ignore[union-attr]
    assert kinds[-3:] == ["response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    fragments = [event.delta for event in events if event.type == "response.function_call_arguments.delta"]
    assert fragments and "".join(fragments) == call.arguments == events[-3].arguments  # type: ignore[union-attr]
    jsonschema.validate(json.loads(call.arguments), WEATHER)
    assert [event.sequence_number for event in events] == list(range(len(events)))


async def test_parse_with_a_pydantic_model(api: Api) -> None:
    from pydantic import BaseModel, Field

    class City(BaseModel):
        name: str = Field(max_length=10)
        population: int = Field(ge=0, le=10**8)

    client, app = api
    parsed = await sdk(client).responses.parse(
        model=served(app), input="A city", text_format=City, temperature=1, max_output_tokens=80
    )
    assert isinstance(parsed.output_parsed, City), parsed.output_text


async def test_input_items_list_the_conversation(api: Api) -> None:
    client, _app = api
    oai = sdk(client)
    first = await oai.responses.create(input="Name a colour.", **GREEDY)
    second = await oai.responses.create(
        input=[{"role": "user", "content": "Another?"}], previous_response_id=first.id, **GREEDY
    )
    listed = [item async for item in oai.responses.input_items.list(second.id, order="asc")]
    assert [item.type for item in listed] == ["message", "message", "message"]
    assert [item.role for item in listed] == ["user", "assistant", "user"]  # type: ignore[union-attr]
    assert listed[0].content[0].text == "Name a colour."  # type: ignore[union-attr]
    assert listed[1].id == first.output[0].id  # the previous output, as it was
    newest = await oai.responses.input_items.list(second.id, limit=1)
    assert [item.id for item in newest.data] == [listed[-1].id] and newest.has_more
    rest = await oai.responses.input_items.list(second.id, limit=5, after=listed[-1].id)
    assert [item.id for item in rest.data] == [listed[1].id, listed[0].id] and not rest.has_more


async def test_background_responses_are_charged_and_refunded_when_cancelled_or_deleted(
    make_settings: MakeSettings,
) -> None:
    tokenizer = build_tokenizer()
    prompt = render_chat_prompt(tokenizer, [ChatMessage(role="user", content="Hi")])
    prompt_tokens = len(tokenizer(prompt, add_special_tokens=True).input_ids)
    settings = make_settings(rate_limit_tpm=prompt_tokens + 12, job_poll_interval_s=60.0)
    async with open_app(settings) as (client, app):
        app.state.textgen.runner._paused_until = time.monotonic() + 3600  # keep them queued
        oai = sdk(client)
        ask = {"input": "Hi", "max_output_tokens": 10, "temperature": 0}
        for end in ("cancel", "delete"):
            queued = await oai.responses.create(background=True, **ask)
            assert queued.status == "queued"
            with pytest.raises(openai.RateLimitError):  # its budget (prompt + 10) is reserved until it ends
                await oai.responses.create(input="Hi", max_output_tokens=1, store=False)
            if end == "cancel":
                assert (await oai.responses.cancel(queued.id)).status == "cancelled"
            else:
                await oai.responses.delete(queued.id)
        finished = await oai.responses.create(**ask)  # the whole budget is back
        assert finished.status in ("completed", "incomplete")
