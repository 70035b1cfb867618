"""The Responses <-> chat translation of ``textgen.services.responses``, without a model: input items to chat
messages, tools / tool_choice / text.format to chat fields, chat stream chunks to the Responses events,
and the field policy (honoured / refused by name / ignored as metadata)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from textgen.errors import InvalidRequestError
from textgen.services.responses import (
    ResponseEvents,
    chat_messages,
    chat_request,
    chat_tool_choice,
    completed_response,
    response_format,
)
from textgen.services.responses_types import IGNORED_FIELDS, ResponseRequest, check_fields

CALL = {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}


def test_items_become_chat_messages() -> None:
    items = [
        {"role": "user", "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Let me look."}]},
        CALL,
        {**CALL, "call_id": "c2", "name": "g"},
        {"type": "function_call_output", "call_id": "c1", "output": "1"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "2"}]},
        CALL,
    ]
    assert chat_messages("Be brief.", items) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "a\nb"},
        {
            "role": "assistant",
            "content": "Let me look.",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "1"},
        {"role": "tool", "tool_call_id": "c2", "content": "2"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
        },
    ]


@pytest.mark.parametrize(
    ("items", "named"),
    [
        ([{"role": ["user"], "content": "x"}], "input[0].role"),
        ([{"role": "tool", "content": "x"}], "input[0].role"),
        ([{"role": "user", "content": {"text": "x"}}], "input[0].content"),
        ([{"role": "user", "content": [{"type": "input_audio", "data": "x"}]}], "input[0].content[0]"),
        ([{"role": "user", "content": [{"type": "input_text", "text": 5}]}], "input[0].content[0]"),
        ([{"role": "user", "content": "x"}, {**CALL, "arguments": {"a": 1}}], "input[1].arguments"),
        ([{"type": "function_call_output", "output": "x"}], "input[0].call_id"),
        ([{"type": "reasoning", "summary": []}], "input[0].type"),
        ([{"type": 7}], "input[0].type"),
    ],
)
def test_malformed_items_are_refused_by_name(items: list[dict[str, Any]], named: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        chat_messages(None, items)
    assert caught.value.param == named and caught.value.message.startswith(named)


def test_tools_tool_choice_and_text_format_map_to_chat() -> None:
    tool = {"type": "function", "name": "f", "parameters": {"type": "object"}, "strict": True}
    body = ResponseRequest.model_validate(
        {
            "input": "hi",
            "tools": [tool],
            "tool_choice": {"type": "function", "name": "f"},
            "parallel_tool_calls": False,
            "max_output_tokens": 9,
            "temperature": 0.5,
        }
    )
    chat = chat_request(body, [{"role": "user", "content": "hi"}], stream=False)
    assert chat.tools is not None and chat.tools[0].function.name == "f"
    assert chat.tool_choice is not None and chat.tool_choice.function.name == "f"  # type: ignore[union-attr]
    assert chat.parallel_tool_calls is False and chat.max_completion_tokens == 9 and chat.temperature == 0.5
    text_format = {"format": {"type": "json_schema", "name": "n", "schema": {"type": "object"}}}
    # A named function allows no text answer, so text.format could not be honoured: refused by name.
    with pytest.raises(InvalidRequestError) as refused:
        chat_request(body.model_copy(update={"text": text_format}), [{"role": "user", "content": "hi"}], stream=False)
    assert refused.value.param == "text.format" and "tool_choice auto" in refused.value.message
    auto = body.model_copy(update={"text": text_format, "tool_choice": "auto"})
    chat = chat_request(
        ResponseRequest.model_validate(auto.model_dump()), [{"role": "user", "content": "hi"}], stream=False
    )
    assert chat.response_format == {
        "type": "json_schema",
        "json_schema": {"name": "n", "schema": {"type": "object"}, "strict": None},
    }
    assert chat_tool_choice("required") == "required"
    assert response_format({"format": {"type": "json_object"}}) == {"type": "json_object"}
    assert response_format(None) is None
    for bad, named in (
        ({"format": "json"}, "text.format"),
        ({"format": {"type": "json_schema"}}, "text.format.schema"),
        ({"verbosity": "high"}, "text.verbosity"),
    ):
        with pytest.raises(InvalidRequestError) as caught:
            response_format(bad)
        assert caught.value.param == named
    with pytest.raises(ValidationError) as invalid:  # only function tools are described, and served
        ResponseRequest.model_validate({"input": "x", "tools": [{"type": "file_search"}]})
    assert invalid.value.errors()[0]["loc"] == ("tools", 0, "type")


def test_field_policy() -> None:
    ignored = {name: None for name in IGNORED_FIELDS} | {"metadata": {"a": "b"}, "user": "u", "service_tier": "flex"}
    asks_nothing = {"include": [], "truncation": "disabled", "reasoning": {}, "top_logprobs": 0, "max_tool_calls": None}
    check_fields(ResponseRequest.model_validate({"input": "x", **ignored, **asks_nothing}))
    for extra, named, says in (
        ({"frobnicate": True}, "frobnicate", "Extra inputs are not permitted"),
        ({"reasoning": {"effort": "low"}}, "reasoning", "not supported: the served model has no reasoning"),
        ({"max_tool_calls": 3}, "max_tool_calls", "not supported"),
        ({"truncation": "auto"}, "truncation", "only 'disabled'"),
        ({"stream_options": {"include_usage": True}, "stream": True}, "stream_options.include_usage", "Extra inputs"),
        ({"metadata": {"k": "v" * 513}}, "metadata.k", "at most 512"),
    ):
        with pytest.raises(ValidationError) as invalid:
            ResponseRequest.model_validate({"input": "x", **extra})
        error = invalid.value.errors()[0]
        assert ".".join(map(str, error["loc"])) == named and says in error["msg"], error
    for extra, named in (
        ({"background": True, "store": False}, "background"),
        ({"background": True, "stream": True}, "stream"),
        ({"stream_options": {"include_obfuscation": False}}, "stream_options"),
    ):
        with pytest.raises(InvalidRequestError) as caught:
            check_fields(ResponseRequest.model_validate({"input": "x", **extra}))
        assert caught.value.param == named


def test_item_errors_name_the_item_and_field() -> None:
    for items, says in (
        ([{"type": "item_reference", "id": "x"}], "input[0].type: Input tag 'item_reference'"),
        ([{"role": "user", "content": "a"}, {"role": "tool", "content": "x"}], "input[1].role: Input should be"),
        ([{"role": "user", "content": [{"type": "input_text", "text": 5}]}], "input[0].content[0].text: Input should"),
        ([{"type": "function_call", "call_id": "a", "name": "b c", "arguments": "{}"}], "input[0].name: String"),
        ([], "List should have at least 1 item"),
    ):
        with pytest.raises(ValidationError) as invalid:
            ResponseRequest.model_validate({"input": items})
        error = invalid.value.errors()[0]
        assert error["loc"] == ("input",) and error["msg"].startswith(says), error


def _chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def test_chat_chunks_become_the_responses_event_sequence() -> None:
    events = ResponseEvents({"id": "resp_x", "status": "in_progress", "output": []})
    sent = events.start()
    for chunk in (
        _chunk({"role": "assistant", "content": ""}),
        _chunk({"content": "Let"}),
        _chunk({"content": " me."}),
        _chunk(
            {
                "tool_calls": [
                    {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}}
                ]
            }
        ),
        _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"a":'}}]}),
        _chunk({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}),
        _chunk({}, "tool_calls"),
        {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}},
    ):
        sent += events.chunk(chunk)
    closing, response = events.end()
    sent += [*closing, events.final(response)]
    assert [e["type"] for e in sent] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e["sequence_number"] for e in sent] == list(range(len(sent)))
    assert [e.get("output_index") for e in sent[2:14]] == [0] * 7 + [1] * 5
    message, call = response["output"]
    assert message["content"][0]["text"] == "Let me." and message["status"] == "completed"
    assert (call["call_id"], call["name"], call["arguments"], call["status"]) == ("call_1", "f", '{"a":1}', "completed")
    assert response["usage"]["total_tokens"] == 7 and response["status"] == "completed"

    # The same answer, not streamed, gives the same output.
    chat = {
        "choices": [
            {
                "message": {
                    "content": "Let me.",
                    "tool_calls": [{"id": "call_1", "function": {"name": "f", "arguments": '{"a":1}'}}],
                },
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
    }
    plain = completed_response({"id": "resp_x", "status": "in_progress", "output": []}, chat)
    strip = [{k: v for k, v in item.items() if k != "id"} for item in plain["output"]]
    assert strip == [{k: v for k, v in item.items() if k != "id"} for item in response["output"]]


def test_an_empty_or_cut_stream_still_closes_a_message() -> None:
    events = ResponseEvents({"id": "resp_x", "status": "in_progress", "output": []})
    events.chunk(_chunk({}, "length"))
    closing, response = events.end()
    assert [e["type"] for e in closing][-1] == "response.output_item.done"
    assert response["status"] == "incomplete" and response["incomplete_details"] == {"reason": "max_output_tokens"}
    assert response["output"][0]["status"] == "incomplete" and response["output"][0]["content"][0]["text"] == ""
    assert events.final(response)["type"] == "response.incomplete"


def test_a_content_filter_finish_is_incomplete_with_its_reason() -> None:
    events = ResponseEvents({"id": "resp_x", "status": "in_progress", "output": []})
    events.chunk(_chunk({"content": '{"a": "I '}, None))
    events.chunk(_chunk({}, "content_filter"))
    _, response = events.end()
    assert response["status"] == "incomplete" and response["incomplete_details"] == {"reason": "content_filter"}
    assert events.final(response)["type"] == "response.incomplete"
    chat = {
        "choices": [{"message": {"content": '{"a": "I '}, "finish_reason": "content_filter"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
    }
    plain = completed_response({"id": "resp_x", "status": "in_progress", "output": []}, chat)
    assert plain["status"] == "incomplete" and plain["incomplete_details"] == {"reason": "content_filter"}
    assert plain["output"][0]["status"] == "incomplete"
