"""Unit tests of ``textgen.services.tools``: the tool-call grammar as llguidance runs it (on the tiny
tokenizer: what each tool_choice lets through and refuses) and the parser that reads calls back, fed whole
and split at every position as a stream would split it."""

from __future__ import annotations

import json
from typing import Any

import llguidance
import llguidance.hf
import pytest

from tests.support.tiny_model import build_tokenizer
from textgen.engine.constraint_sandbox import llguidance_grammar
from textgen.services.requests import ChatCompletionRequest
from textgen.services.tools import (
    MAX_PARALLEL_CALLS,
    NUMBER_STEP,
    ArgumentsDelta,
    CallStart,
    ContentDelta,
    ToolCallParser,
    ToolPlan,
    bounded_numbers,
    declared_arguments_only,
    parse_tool_calls,
    tool_call_constraint,
    tool_plan,
)

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "ping"}},  # no parameters: an empty object
]
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city":"Paris","days":2}}</tool_call>'
PING = '<tool_call>{"name": "ping", "arguments": {}}</tool_call>'


@pytest.fixture(scope="module")
def ll_tokenizer() -> tuple[Any, llguidance.LLTokenizer]:
    tokenizer = build_tokenizer()
    return tokenizer, llguidance.hf.from_tokenizer(tokenizer)


def plan_of(**fields: Any) -> ToolPlan:
    return tool_plan(ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}], **fields}))


def accepts(tokenizers: tuple[Any, llguidance.LLTokenizer], plan: ToolPlan, text: str) -> bool:
    """Whether the plan's grammar lets the model write ``text`` and stop there."""
    tokenizer, ll = tokenizers
    constraint = tool_call_constraint(plan)
    assert constraint is not None
    matcher = llguidance.LLMatcher(ll, llguidance_grammar(constraint.kind, constraint.spec), log_level=0)
    assert not matcher.is_error(), matcher.get_error()
    for token in tokenizer.encode(text, add_special_tokens=False):
        if not matcher.consume_token(token):
            return False
    return bool(matcher.is_accepting())


def test_required_takes_only_calls_and_only_valid_arguments(ll_tokenizer: Any) -> None:
    plan = plan_of(tools=TOOLS, tool_choice="required")
    assert accepts(ll_tokenizer, plan, CALL)
    assert accepts(ll_tokenizer, plan, CALL + "\n" + PING)  # parallel by default
    assert accepts(ll_tokenizer, plan, PING * MAX_PARALLEL_CALLS)
    assert not accepts(ll_tokenizer, plan, PING * (MAX_PARALLEL_CALLS + 1))  # the answer ends at the cap
    assert not accepts(ll_tokenizer, plan, "Sure. " + CALL)
    assert not accepts(ll_tokenizer, plan, "The weather is fine.")
    assert not accepts(ll_tokenizer, plan, CALL.replace('"Paris"', "42"))  # city must be a string
    assert not accepts(ll_tokenizer, plan, CALL.replace("get_weather", "get_time"))
    assert not accepts(ll_tokenizer, plan, CALL.replace(',"days":2', ',"hours":2'))  # no extra properties
    single = plan_of(tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    assert accepts(ll_tokenizer, single, CALL) and not accepts(ll_tokenizer, single, CALL + PING)


def test_a_named_function_is_the_only_one_allowed(ll_tokenizer: Any) -> None:
    plan = plan_of(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "ping"}})
    assert accepts(ll_tokenizer, plan, PING)
    assert not accepts(ll_tokenizer, plan, CALL)


def test_auto_leaves_prose_free_and_holds_a_started_call(ll_tokenizer: Any) -> None:
    plan = plan_of(tools=TOOLS)
    assert plan.mode == "auto"
    assert accepts(ll_tokenizer, plan, "The weather in Paris is < 20 degrees; <tool or not.")
    assert accepts(ll_tokenizer, plan, "Let me check. " + CALL)
    assert accepts(ll_tokenizer, plan, CALL + PING)
    assert not accepts(ll_tokenizer, plan, "Let me check. <tool_call> I will not")
    assert not accepts(ll_tokenizer, plan, "Let me check. " + CALL.replace('"Paris"', "1"))
    assert not accepts(ll_tokenizer, plan, CALL + " and some prose after")
    assert not accepts(ll_tokenizer, plan, "")  # an answer says something


def test_open_numbers_take_at_most_six_decimals(ll_tokenizer: Any) -> None:
    schema = {"type": "object", "properties": {"x": {"type": "number"}, "e": {"enum": [{"type": "number"}]}}}
    narrowed = bounded_numbers(schema)
    assert narrowed["properties"]["x"] == {"type": "number", "multipleOf": NUMBER_STEP}
    assert narrowed["properties"]["e"] == schema["properties"]["e"]  # data, not a schema
    plan = plan_of(
        tools=[{"type": "function", "function": {"name": "f", "parameters": schema}}], tool_choice="required"
    )
    call = '<tool_call>{"name": "f", "arguments": {"x":%s}}</tool_call>'
    assert accepts(ll_tokenizer, plan, call % "3.141592")
    assert not accepts(ll_tokenizer, plan, call % "3.1415926")


def test_a_call_takes_only_the_arguments_its_function_declares(ll_tokenizer: Any) -> None:
    """Objects that declare properties and say nothing of other keys take no others (a small model otherwise
    writes keys of its own until its budget is gone); what the schema says explicitly, and data, stay."""
    point = {"type": "object", "properties": {"x": {"type": "integer"}}}
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 20},
            "at": point,
            "tags": {"type": "object", "additionalProperties": {"type": "string"}},  # an open map, said so
            "properties": {"type": "object", "properties": {"k": {"type": "integer"}}},  # a name, not a keyword
            "choice": {"enum": [{"type": "object", "properties": {}}]},  # data
        },
        "$defs": {"p": point},
    }
    closed = declared_arguments_only(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["at"]["additionalProperties"] is False
    assert closed["$defs"]["p"]["additionalProperties"] is False
    assert closed["properties"]["tags"] == schema["properties"]["tags"]
    assert closed["properties"]["properties"]["additionalProperties"] is False
    assert "additionalProperties" not in closed["properties"]
    assert closed["properties"]["choice"] == schema["properties"]["choice"]
    assert "additionalProperties" not in schema  # a copy: the request's own schema is untouched
    plan = plan_of(
        tools=[{"type": "function", "function": {"name": "f", "parameters": schema}}], tool_choice="required"
    )
    call = '<tool_call>{"name": "f", "arguments": %s}</tool_call>'
    assert accepts(ll_tokenizer, plan, call % '{"city":"Paris","at":{"x":1},"tags":{"any":"key"}}')
    assert not accepts(ll_tokenizer, plan, call % '{"city":"Paris","description":"extra"}')
    assert not accepts(ll_tokenizer, plan, call % '{"at":{"x":1,"y":2}}')


def test_an_intersection_is_left_open() -> None:
    """Closing allOf's parts could leave no object satisfying all of them: such a schema is not changed."""
    schema = {"allOf": [{"type": "object", "properties": {"a": {}}}, {"properties": {"b": {}}}]}
    assert declared_arguments_only(schema) == schema


def test_none_and_no_tools_constrain_nothing() -> None:
    assert tool_call_constraint(plan_of(tools=TOOLS, tool_choice="none")) is None
    assert tool_call_constraint(plan_of()) is None


def test_legacy_functions_map_onto_one_call() -> None:
    plan = plan_of(functions=[t["function"] for t in TOOLS], function_call={"name": "ping"})
    assert plan.legacy and plan.mode == "named" and plan.named == "ping" and not plan.parallel
    assert plan_of(functions=[t["function"] for t in TOOLS]).mode == "auto"
    assert plan_of(functions=[t["function"] for t in TOOLS], function_call="none").mode == "none"


def test_the_parser_reads_content_and_calls() -> None:
    parsed = parse_tool_calls("Let me look. " + CALL + "\n" + PING)
    assert parsed.content == "Let me look. "
    assert [(c.name, json.loads(c.arguments), c.complete) for c in parsed.calls] == [
        ("get_weather", {"city": "Paris", "days": 2}, True),
        ("ping", {}, True),
    ]
    assert parse_tool_calls("No calls < here <tool").content == "No calls < here <tool"


def test_arguments_may_hold_the_closing_marker_inside_strings() -> None:
    tricky = '<tool_call>{"name": "get_weather", "arguments": {"city":"}</tool_call>\\"{"}}</tool_call>'
    [call] = parse_tool_calls(tricky).calls
    assert call.complete and json.loads(call.arguments) == {"city": '}</tool_call>"{'}


def test_an_unfinished_call_is_not_complete() -> None:
    parsed = parse_tool_calls(CALL + '<tool_call>{"name": "ping", "arguments": {"a')
    assert [c.complete for c in parsed.calls] == [True, False]
    assert parsed.complete_calls == parsed.calls[:1]


def _stream(text: str, cuts: list[int]) -> tuple[str, list[tuple[str, str]]]:
    parser = ToolCallParser()
    events = []
    start = 0
    for cut in [*cuts, len(text)]:
        events += parser.feed(text[start:cut])
        start = cut
    events += parser.finish()
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    calls: list[tuple[str, str]] = []
    for event in events:
        if isinstance(event, CallStart):
            assert event.index == len(calls)
            calls.append((event.name, ""))
        elif isinstance(event, ArgumentsDelta):
            name, arguments = calls[event.index]
            calls[event.index] = (name, arguments + event.text)
    return content, calls


@pytest.mark.parametrize("text", ["Checking <b>now</b>. " + CALL + "\n" + PING, "plain text <tool_ca", CALL])
def test_streamed_parsing_gives_the_same_answer_wherever_the_text_is_split(text: str) -> None:
    whole = parse_tool_calls(text)
    expected = (whole.content, [(c.name, c.arguments) for c in whole.calls])
    for cut in range(len(text) + 1):
        assert _stream(text, [cut]) == expected, cut
    assert _stream(text, list(range(1, len(text)))) == expected  # one character at a time


# A template that lays out tools itself (as Qwen's or Hermes' do): tools, calls and results go through it.
TOOL_TEMPLATE = (
    "{% if tools %}TOOLS:{% for t in tools %}[{{ t.function.name }}]{% endfor %}\n{% endif %}"
    "{% for m in messages %}<{{ m.role }}{% if m.name %} name={{ m.name }}{% endif %}>{{ m.content }}"
    "{% for c in m.tool_calls or [] %}CALL {{ c.function.name }} {{ c.function.arguments.city }}{% endfor %}"
    "{% if m.tool_call_id %} for {{ m.tool_call_id }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def test_a_template_that_takes_tools_renders_them_itself() -> None:
    from textgen.services.messages import template_supports_tools
    from textgen.services.openai import render_chat_prompt

    tokenizer = build_tokenizer()
    assert not template_supports_tools(tokenizer)  # no template at all: the fallback
    tokenizer.chat_template = TOOL_TEMPLATE
    assert template_supports_tools(tokenizer)
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    request = ChatCompletionRequest.model_validate(
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "Weather?"}], "name": "ann"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "cold"},
            ],
            "tools": TOOLS,
        }
    )
    prompt = render_chat_prompt(tokenizer, request.messages, tool_plan(request))
    assert prompt == (  # (transformers renders templates with trim_blocks: no newlines after tags)
        "TOOLS:[get_weather][ping]<user name=ann>Weather?<assistant>CALL get_weather Oslo"
        "<tool name=get_weather>cold for call_1<assistant>"
    )
    none = request.model_copy(update={"tool_choice": "none"})
    assert "TOOLS" not in render_chat_prompt(tokenizer, none.messages, tool_plan(none))
