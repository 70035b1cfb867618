"""Integration tests of tool calling and the chat message shapes on /v1/chat/completions (tiny GPT-2, app
over ASGITransport): content parts, assistant tool_calls with null content, tool / function results,
names; each tool_choice, parallel calls, the legacy functions API, streamed tool-call deltas and the
errors, each naming its param.

The tiny model is random, so what a free answer says is noise; with tool_choice required or a named
function the grammar holds it to calls, so those answers are checked exactly: names, ids, arguments that
parse and validate against the function's schema.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import pytest_asyncio
from fastapi import FastAPI

from tests.integration.test_batches import ALICE, batch_settings, content, ended, run_batch, serve
from tests.integration.test_openai_api import assert_openai_error, post_ok, stream_chunks
from tests.support.app import open_app, tiny_settings
from tests.support.batch_files import chat_line, parse_batch_output
from tests.support.tools import TIME, WEATHER
from textgen.services.openai import render_chat_prompt
from textgen.services.requests import ChatCompletionRequest
from textgen.services.tools import tool_plan

Api = tuple[httpx.AsyncClient, FastAPI]
CHAT = "/v1/chat/completions"

TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather in a city.", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "get_time", "description": "Time in a zone.", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
ROUND_TRIP = [
    {"role": "system", "content": "You are a weather bot."},
    {
        "role": "user",
        "content": [{"type": "text", "text": "Weather in"}, {"type": "text", "text": "Paris?"}],
        "name": "ann",
    },
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_abc",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_abc", "content": "18 degrees and sunny"},
]


@pytest_asyncio.fixture(scope="module")
async def api(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Api]:
    folder = tmp_path_factory.mktemp("tools-api")
    async with open_app(tiny_settings(tiny_model_dir, folder)) as (client, app):
        yield client, app


def rendered(app: FastAPI, body: dict[str, Any]) -> str:
    request = ChatCompletionRequest.model_validate(body)
    return render_chat_prompt(app.state.textgen.model.tokenizer, request.messages, tool_plan(request))


def assert_valid_calls(message: dict[str, Any], names: set[str]) -> list[dict[str, Any]]:
    calls = message["tool_calls"]
    assert calls, message
    for call in calls:
        assert call["type"] == "function" and call["id"].startswith("call_") and len(call["id"]) > 10, call
        name = call["function"]["name"]
        assert name in names, call
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[name])
    assert len({call["id"] for call in calls}) == len(calls)
    return list(calls)


# ----- message shapes ------------------------------------------------------------------------------------


async def test_content_parts_are_joined_text(api: Api) -> None:
    client, app = api
    body = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]}
        ]
    }
    reply = await post_ok(client, CHAT, {**body, "max_tokens": 3})
    assert reply["choices"][0]["message"]["role"] == "assistant"
    assert "user: Hello\nthere\n" in rendered(app, body)


@pytest.mark.parametrize(
    ("part", "kind"),
    [
        ({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}, "image_url"),
        ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}, "input_audio"),
        ({"type": "file", "file": {"file_id": "file-1"}}, "file"),
    ],
)
async def test_media_parts_are_refused_naming_the_part(api: Api, part: dict[str, Any], kind: str) -> None:
    client, _ = api
    messages = [
        {"role": "system", "content": "Hi"},
        {"role": "user", "content": [{"type": "text", "text": "Look"}, part]},
    ]
    error = assert_openai_error(await client.post(CHAT, json={"messages": messages}), 400)
    assert error["param"] == "messages.1.content.1"
    assert "text only" in error["message"] and kind in error["message"]


async def test_an_agent_round_trip_renders_calls_and_results(api: Api) -> None:
    client, app = api
    body = {"messages": ROUND_TRIP, "tools": TOOLS}
    reply = await post_ok(client, CHAT, {**body, "max_tokens": 4, "tool_choice": "none"})
    assert reply["choices"][0]["finish_reason"] in ("stop", "length")
    prompt = rendered(app, body)
    assert (
        'assistant: <tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}</tool_call>'
        in prompt
    )
    assert "user: <tool_response>\n18 degrees and sunny\n</tool_response>" in prompt
    assert "user: Weather in\nParis?" in prompt
    assert "<tools>" in prompt and '"name":"get_time"' in prompt  # the fallback's system block
    assert prompt.index("You are a weather bot.") < prompt.index("<tools>")  # one system turn, tools appended


async def test_consecutive_tool_results_share_one_turn_and_legacy_function_messages_work(api: Api) -> None:
    client, app = api
    messages = [
        *ROUND_TRIP,
        {"role": "tool", "tool_call_id": "call_def", "content": "UTC+1"},
        {"role": "assistant", "content": None, "function_call": {"name": "get_time", "arguments": '{"zone": 1}'}},
        {"role": "function", "name": "get_time", "content": "10:00"},
    ]
    await post_ok(client, CHAT, {"messages": messages, "max_tokens": 2})
    prompt = rendered(app, {"messages": messages})
    assert "<tool_response>\n18 degrees and sunny\n</tool_response>\n<tool_response>\nUTC+1\n</tool_response>" in prompt
    assert '<tool_call>{"name": "get_time", "arguments": {"zone": 1}}</tool_call>' in prompt
    assert "<tool_response>\n10:00\n</tool_response>" in prompt
    assert "<tools>" not in prompt  # no tools offered


@pytest.mark.parametrize(
    ("message", "param"),
    [
        ({"role": "tool", "content": "x"}, "messages.1.tool_call_id"),
        ({"role": "function", "content": "x"}, "messages.1.name"),
        ({"role": "user", "content": None}, "messages.1.content"),
        ({"role": "user", "content": "x", "tool_calls": ROUND_TRIP[2]["tool_calls"]}, "messages.1.tool_calls"),
        ({"role": "user", "content": [{"type": "text"}]}, "messages.1.content.0.text"),
        ({"role": "user", "content": [{"type": "video"}]}, "messages.1.content.0.type"),
    ],
)
async def test_malformed_messages_name_the_field(api: Api, message: dict[str, Any], param: str) -> None:
    client, _ = api
    body = {"messages": [{"role": "user", "content": "Hi"}, message]}
    error = assert_openai_error(await client.post(CHAT, json=body), 400)
    assert error["param"] == param, error


async def test_the_content_filter_reads_tool_results_and_call_arguments(api: Api) -> None:
    client, _ = api
    result = [*ROUND_TRIP[:3], {"role": "tool", "tool_call_id": "call_abc", "content": "I hate rain."}]
    assert_openai_error(await client.post(CHAT, json={"messages": result}), 400)
    call = json.loads(json.dumps(ROUND_TRIP[2]))
    call["tool_calls"][0]["function"]["arguments"] = '{"city": "I hate rain"}'
    assert_openai_error(await client.post(CHAT, json={"messages": [*ROUND_TRIP[:2], call]}), 400)
    parts = [{"role": "user", "content": [{"type": "text", "text": "fine"}, {"type": "text", "text": "I hate rain."}]}]
    assert_openai_error(await client.post(CHAT, json={"messages": parts}), 400)


# ----- tool_choice -----------------------------------------------------------------------------------------


async def test_required_answers_with_valid_calls_only(api: Api) -> None:
    client, _ = api
    for seed in range(4):
        body = {
            "messages": ASK,
            "tools": TOOLS,
            "tool_choice": "required",
            "parallel_tool_calls": False,
            "max_tokens": 120,
            "seed": seed,
        }
        reply = await post_ok(client, CHAT, body)
        [choice] = reply["choices"]
        assert choice["finish_reason"] == "tool_calls", choice
        assert choice["message"]["content"] is None
        assert_valid_calls(choice["message"], {"get_weather", "get_time"})


async def test_a_named_function_is_called_exactly_once_whatever_parallel_tool_calls_says(api: Api) -> None:
    client, _ = api
    named = {"type": "function", "function": {"name": "get_time"}}
    for seed, parallel in enumerate((False, True, None)):
        body = {
            "messages": ASK,
            "tools": TOOLS,
            "tool_choice": named,
            "parallel_tool_calls": parallel,
            "max_tokens": 120,
            "seed": seed,
            "n": 2,
        }
        reply = await post_ok(client, CHAT, body)
        for choice in reply["choices"]:
            assert choice["finish_reason"] == "tool_calls"
            [call] = assert_valid_calls(choice["message"], {"get_time"})
            assert call["function"]["name"] == "get_time"


async def test_parallel_calls_each_validate(api: Api) -> None:
    client, _ = api
    calls = 0
    for seed in range(6):
        body = {"messages": ASK, "tools": TOOLS, "tool_choice": "required", "max_tokens": 200, "seed": seed}
        choice = (await post_ok(client, CHAT, body))["choices"][0]
        # A random model may keep adding calls until the budget: the finished ones still come back whole.
        assert choice["finish_reason"] in ("tool_calls", "length")
        calls += len(assert_valid_calls(choice["message"], {"get_weather", "get_time"}))
    assert calls > 6  # several calls per answer
    plan = tool_plan(ChatCompletionRequest.model_validate({"messages": ASK, "tools": TOOLS, "tool_choice": "required"}))
    assert plan.parallel  # OpenAI's default


async def test_auto_answers_in_text_or_calls_and_none_offers_no_tools(api: Api) -> None:
    client, app = api
    for seed in range(4):
        body = {"messages": ASK, "tools": TOOLS, "max_tokens": 40, "seed": seed}  # auto is the default
        choice = (await post_ok(client, CHAT, body))["choices"][0]
        message = choice["message"]
        if "tool_calls" in message:
            assert choice["finish_reason"] in ("tool_calls", "length")
            assert_valid_calls(message, {"get_weather", "get_time"})
        else:
            assert isinstance(message["content"], str) and "<tool_call>" not in message["content"]
    assert "<tools>" in rendered(app, {"messages": ASK, "tools": TOOLS})
    none = {"messages": ASK, "tools": TOOLS, "tool_choice": "none"}
    assert "<tools>" not in rendered(app, none)
    choice = (await post_ok(client, CHAT, {**none, "max_tokens": 8, "seed": 1}))["choices"][0]
    assert "tool_calls" not in choice["message"] and choice["finish_reason"] in ("stop", "length")


async def test_legacy_functions_answer_with_function_call(api: Api) -> None:
    client, app = api
    functions = [tool["function"] for tool in TOOLS]
    body = {"messages": ASK, "functions": functions, "function_call": {"name": "get_weather"}, "max_tokens": 120}
    choice = (await post_ok(client, CHAT, {**body, "seed": 3}))["choices"][0]
    assert choice["finish_reason"] == "function_call"
    message = choice["message"]
    assert "tool_calls" not in message and message["content"] is None
    assert message["function_call"]["name"] == "get_weather"
    jsonschema.validate(json.loads(message["function_call"]["arguments"]), WEATHER)
    assert "<tools>" in rendered(app, body)


async def test_streamed_tool_calls_arrive_as_openai_deltas(api: Api) -> None:
    client, _ = api
    body = {"messages": ASK, "tools": TOOLS, "tool_choice": "required", "max_tokens": 200, "seed": 11}
    _, chunks = await stream_chunks(client, CHAT, body)
    deltas = [chunk["choices"][0]["delta"] for chunk in chunks if chunk["choices"]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    calls: dict[int, dict[str, Any]] = {}
    for delta in deltas[1:]:
        assert "content" not in delta, delta  # required: nothing but calls
        for piece in delta.get("tool_calls", []):
            if piece["index"] not in calls:  # the first chunk of a call: index, id, type, name, arguments ""
                assert set(piece) == {"index", "id", "type", "function"} and piece["type"] == "function"
                assert piece["function"]["arguments"] == "" and piece["id"].startswith("call_")
                calls[piece["index"]] = {"name": piece["function"]["name"], "arguments": ""}
            else:
                assert set(piece) == {"index", "function"} and set(piece["function"]) == {"arguments"}
                calls[piece["index"]]["arguments"] += piece["function"]["arguments"]
    finish = chunks[-1]["choices"][0]["finish_reason"]
    assert calls and sorted(calls) == list(range(len(calls)))
    if finish == "tool_calls":
        for call in calls.values():
            jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])
    else:
        assert finish == "length"
    # The same seed without streaming gives the same calls.
    reply = await post_ok(client, CHAT, body)
    message = reply["choices"][0]["message"]
    if finish == "tool_calls":
        assert [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]] == [
            (c["name"], c["arguments"]) for c in calls.values()
        ]


async def test_streamed_legacy_function_call(api: Api) -> None:
    client, _ = api
    functions = [tool["function"] for tool in TOOLS]
    body = {
        "messages": ASK,
        "functions": functions,
        "function_call": {"name": "get_time"},
        "max_tokens": 120,
        "seed": 2,
    }
    _, chunks = await stream_chunks(client, CHAT, body)
    deltas = [chunk["choices"][0]["delta"] for chunk in chunks if chunk["choices"]]
    pieces = [delta["function_call"] for delta in deltas if "function_call" in delta]
    assert pieces[0] == {"name": "get_time", "arguments": ""}
    jsonschema.validate(json.loads("".join(piece["arguments"] for piece in pieces[1:])), TIME)
    assert chunks[-1]["choices"][0]["finish_reason"] == "function_call"


# ----- errors ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
        ({"tool_choice": "required"}, "tool_choice", "offers none"),
        ({"tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice", "offers none"),
        ({"functions": [TOOLS[0]["function"]], "function_call": {"name": "x"}}, "function_call", "'x'"),
        ({"tools": TOOLS, "functions": [TOOLS[0]["function"]]}, "functions", "not both"),
        ({"tools": [TOOLS[0], TOOLS[0]]}, "tools.1.function.name", "distinct"),
        (
            {"tools": [TOOLS[0], {"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
            "tools.1.function.parameters",
            "object",
        ),
        # A forced call leaves no text answer for response_format to shape: refused, not silently ignored.
        (
            {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
            "response_format",
            "tool_choice required",
        ),
        (
            {
                "tools": TOOLS,
                "tool_choice": {"type": "function", "function": {"name": "get_time"}},
                "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": WEATHER}},
            },
            "response_format",
            "'get_time'",
        ),
        (
            {
                "functions": [TOOLS[0]["function"]],
                "function_call": {"name": "get_weather"},
                "response_format": {"type": "json_object"},
            },
            "response_format",
            "function_call",
        ),
    ],
)
async def test_tool_errors_name_the_param(api: Api, extra: dict[str, Any], param: str, words: str) -> None:
    client, _ = api
    error = assert_openai_error(await client.post(CHAT, json={"messages": ASK, **extra}), 400)
    assert error["param"] == param, error
    assert words in error["message"], error


async def test_a_schema_the_grammar_engine_refuses_names_its_tool(api: Api) -> None:
    client, _ = api
    bad = {"type": "object", "properties": {"a": {"type": "strin"}}}
    tools = [TOOLS[0], {"type": "function", "function": {"name": "bad", "parameters": bad}}]
    for choice in ("required", "auto"):
        error = assert_openai_error(
            await client.post(CHAT, json={"messages": ASK, "tools": tools, "tool_choice": choice}), 400
        )
        assert error["param"] == "tools.1.function.parameters", error


async def test_a_schema_over_the_limits_is_refused_before_compiling(api: Api) -> None:
    client, _ = api
    deep: dict[str, Any] = {"type": "object"}
    for _ in range(80):
        deep = {"type": "object", "properties": {"a": deep}}
    tools = [{"type": "function", "function": {"name": "deep", "parameters": deep}}]
    for choice in ("none", "required"):
        body = {"messages": ASK, "tools": tools, "tool_choice": choice}
        error = assert_openai_error(await client.post(CHAT, json=body), 400)
        assert error["param"] == "tools.0.function.parameters" and "limit" in error["message"], error


async def test_a_non_function_tool_type_is_refused(api: Api) -> None:
    client, _ = api
    body = {"messages": ASK, "tools": [{"type": "web_search"}]}
    error = assert_openai_error(await client.post(CHAT, json=body), 400)
    assert error["param"] is not None and error["param"].startswith("tools.0"), error


# ----- batch lines -----------------------------------------------------------------------------------------


async def test_batch_lines_call_tools_and_name_the_param_of_a_bad_line(make_settings: Callable[..., Any]) -> None:
    def tool_line(custom_id: str, **body: Any) -> dict[str, Any]:
        line = chat_line(custom_id)
        line["body"].update(tools=TOOLS, max_tokens=120, parallel_tool_calls=False, **body)
        return line

    lines = [
        tool_line("required", tool_choice="required", seed=1),
        tool_line("named", tool_choice={"type": "function", "function": {"name": "get_time"}}, seed=2),
        tool_line("unknown", tool_choice={"type": "function", "function": {"name": "nope"}}),
    ]
    async with serve(batch_settings(make_settings)) as (_app, client):
        oai = client(ALICE)
        done = await ended(oai, (await run_batch(oai, lines, CHAT)).id)
        good = parse_batch_output(await content(oai, done.output_file_id), CHAT)
        bad = parse_batch_output(await content(oai, done.error_file_id), CHAT)
    assert sorted(good) == ["named", "required"] and list(bad) == ["unknown"]
    for custom_id, names in (("required", {"get_weather", "get_time"}), ("named", {"get_time"})):
        [choice] = good[custom_id]["response"]["body"]["choices"]
        assert choice["finish_reason"] == "tool_calls"
        assert_valid_calls(choice["message"], names)
    assert bad["unknown"]["response"]["body"]["error"]["param"] == "tool_choice"


# ----- the content filter in tool arguments ------------------------------------------------------------------

# A function whose schema forces a blocked word (the default list blocks "hate") into a bounded string: what
# the model writes is decided by the grammar, so the filter is certain to match inside the arguments.
FORCED_WORD = {
    "type": "object",
    "properties": {"note": {"type": "string", "enum": ["I hate rain"], "maxLength": 11}},
    "required": ["note"],
    "additionalProperties": False,
}
FORCED_TOOLS = [{"type": "function", "function": {"name": "take_note", "parameters": FORCED_WORD}}]
FORCED = {"type": "function", "function": {"name": "take_note"}}


async def test_a_blocked_word_in_call_arguments_ends_the_answer_rather_than_breaking_the_schema(api: Api) -> None:
    """Redacting inside arguments ("I [redacted] rain") would hand the client a call that fails its own
    schema (enum, maxLength): the answer ends at the match with finish_reason content_filter, as OpenAI's."""
    client, _ = api
    for choice_field in (FORCED, "required"):
        body = {"messages": ASK, "tools": FORCED_TOOLS, "tool_choice": choice_field, "max_tokens": 60, "seed": 1}
        reply = await post_ok(client, CHAT, {**body, "parallel_tool_calls": False})
        [choice] = reply["choices"]
        assert choice["finish_reason"] == "content_filter", choice
        assert "[redacted]" not in json.dumps(choice) and "hate" not in json.dumps(choice)
        assert not choice["message"].get("tool_calls"), choice  # the cut call is no call
        assert reply["usage"]["completion_tokens"] > 0


async def test_a_streamed_call_stops_before_a_blocked_word(api: Api) -> None:
    client, _ = api
    body = {"messages": ASK, "tools": FORCED_TOOLS, "tool_choice": FORCED, "max_tokens": 60, "seed": 2}
    _, chunks = await stream_chunks(client, CHAT, body)
    arguments = "".join(
        piece["function"].get("arguments", "")
        for chunk in chunks
        if chunk["choices"]
        for piece in chunk["choices"][0]["delta"].get("tool_calls", [])
    )
    assert arguments == '{"note":"I ', arguments  # everything before the match, nothing after it
    assert "[redacted]" not in json.dumps(chunks) and "hate" not in json.dumps(chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "content_filter"


async def test_calls_finished_before_the_match_are_kept(api: Api) -> None:
    """Parallel calls: get_time's call, complete and clean, then a call that hits the filter."""
    client, _ = api
    tools = [TOOLS[1], *FORCED_TOOLS]
    for seed in range(12):
        body = {"messages": ASK, "tools": tools, "tool_choice": "required", "max_tokens": 200, "seed": seed}
        choice = (await post_ok(client, CHAT, body))["choices"][0]
        calls = choice["message"].get("tool_calls") or []
        if calls and choice["finish_reason"] == "content_filter":
            break
    else:
        pytest.fail("no seed gave a complete call before a filtered one")
    for call in calls:
        assert call["function"]["name"] == "get_time", call
        jsonschema.validate(json.loads(call["function"]["arguments"]), TIME)


async def test_response_format_is_honoured_where_a_text_answer_is_allowed(api: Api) -> None:
    """With tool_choice auto or none, response_format shapes the text answer; "text" is no constraint, so it
    goes with any tool_choice."""
    client, _ = api
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer"}},
        "required": ["n"],
        "additionalProperties": False,
    }
    formatted = {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}
    body = {"messages": ASK, "tools": TOOLS, "tool_choice": "none", "response_format": formatted, "max_tokens": 30}
    choice = (await post_ok(client, CHAT, {**body, "seed": 1}))["choices"][0]
    if choice["finish_reason"] == "stop":
        jsonschema.validate(json.loads(choice["message"]["content"]), schema)
    else:
        assert choice["message"]["content"].startswith("{")
    body = {**body, "tool_choice": "required", "response_format": {"type": "text"}, "max_tokens": 120}
    choice = (await post_ok(client, CHAT, body))["choices"][0]
    assert choice["finish_reason"] in ("tool_calls", "length")
