"""Chat messages as the model's chat template sees them: every message shape OpenAI's chat API takes
(content as a string or a list of parts, assistant ``tool_calls`` with null content, ``tool`` and legacy
``function`` results, ``name``), checked with a 400 that names the field, and rendered to a prompt.

Two renderings, chosen per template (``template_supports_tools``):

- the template takes ``tools`` (it renders a probe tool's name when given one): tools, assistant calls
  and tool results go to ``apply_chat_template`` in the transformers shape and the template lays them out;
- otherwise (SmolLM2's template, or no template at all) the documented fallback: a system block that
  lists the functions and the call format (``textgen.services.tools.tools_system_prompt``), earlier calls
  written as ``<tool_call>`` blocks in the assistant turn, tool results as a user turn of
  ``<tool_response>`` blocks (consecutive results share one turn).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from textgen.errors import InvalidRequestError
from textgen.services.requests import ChatMessage
from textgen.services.tools import NO_TOOLS, ToolPlan, arguments_value, call_block, tools_system_prompt

logger = logging.getLogger(__name__)

TEXT_PARTS = {"text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal"}
MEDIA_PARTS = ("image_url", "input_image", "image", "input_audio", "audio", "file", "input_file", "video_url")
_PROBE_TOOL = "textgen_probe_tool_3f9c"


def content_text(content: str | list[dict[str, Any]] | None, where: str) -> str:
    """A message's content as text: a string as it is; text parts joined by newlines; media refused."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts: list[str] = []
    for index, part in enumerate(content):
        kind = part.get("type")
        param = f"{where}.{index}"
        if kind in TEXT_PARTS:
            text = part.get(TEXT_PARTS[kind])
            if not isinstance(text, str):
                raise InvalidRequestError(
                    f"{param}.{TEXT_PARTS[kind]}: a {kind} part needs its text as a string.",
                    param=f"{param}.{TEXT_PARTS[kind]}",
                )
            texts.append(text)
        elif kind in MEDIA_PARTS:
            raise InvalidRequestError(
                f"{param}: this model takes text only; {kind} content parts are not supported. "
                "Send the message's content as text parts or a string.",
                param=param,
            )
        else:
            raise InvalidRequestError(
                f"{param}.type: unknown content part type {kind!r}; this model takes 'text' parts.",
                param=f"{param}.type",
            )
    return "\n".join(texts)


def check_messages(messages: Sequence[ChatMessage]) -> None:
    """The rules OpenAI applies per role, each a 400 naming the field (content parts are checked as
    they are read)."""
    for index, message in enumerate(messages):
        where = f"messages.{index}"
        if message.role != "assistant" and (message.tool_calls is not None or message.function_call is not None):
            name = "tool_calls" if message.tool_calls is not None else "function_call"
            raise InvalidRequestError(f"{where}.{name}: only assistant messages carry {name}.", param=f"{where}.{name}")
        if message.role in ("system", "developer", "user", "tool") and message.content is None:
            raise InvalidRequestError(
                f"{where}.content: a {message.role} message needs content.", param=f"{where}.content"
            )
        if message.role == "tool" and not message.tool_call_id:
            raise InvalidRequestError(
                f"{where}.tool_call_id: a tool message names the call it answers with tool_call_id.",
                param=f"{where}.tool_call_id",
            )
        if message.role == "function" and not message.name:
            raise InvalidRequestError(
                f"{where}.name: a function message names the function it answers.", param=f"{where}.name"
            )
        content_text(message.content, f"{where}.content")


def message_texts(messages: Sequence[ChatMessage], plan: ToolPlan = NO_TOOLS) -> list[str]:
    """All the text a request puts before the model, for the content filter and the length check: each
    message's content, the arguments of earlier calls, and the offered functions' descriptions."""
    texts = [content_text(m.content, f"messages.{i}.content") for i, m in enumerate(messages)]
    for message in messages:
        texts.extend(call.function.arguments for call in message.tool_calls or ())
        if message.function_call is not None:
            texts.append(message.function_call.arguments)
    texts.extend(f.description for f in plan.offered() if f.description)
    return texts


@functools.lru_cache(maxsize=8)
def _template_renders_tools(template: str, tokenizer: PreTrainedTokenizerBase) -> bool:
    probe: list[dict[Any, Any] | Callable[..., Any]] = [
        {"type": "function", "function": {"name": _PROBE_TOOL, "description": "", "parameters": {}}}
    ]
    try:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}], tools=probe, tokenize=False, add_generation_prompt=True
        )
    except Exception:  # a template that fails on tools does not support them
        return False
    supports = _PROBE_TOOL in str(rendered)
    logger.info("The chat template %s tools", "renders" if supports else "does not render")
    return supports


def template_supports_tools(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the model's chat template lays out ``tools`` itself (it shows a probe tool's name)."""
    template = tokenizer.chat_template
    if not template:
        return False
    return _template_renders_tools(str(template), tokenizer)


def _call_id_names(messages: Sequence[ChatMessage]) -> dict[str, str]:
    return {call.id: call.function.name for m in messages for call in m.tool_calls or () if call.id}


def native_turns(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """Messages in the shape transformers' tool-aware templates read."""
    names = _call_id_names(messages)
    turns: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        text = content_text(message.content, f"messages.{index}.content")
        turn: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role, "content": text}
        if message.name:
            turn["name"] = message.name
        calls = [(c.id, c.function.name, c.function.arguments) for c in message.tool_calls or ()]
        if message.function_call is not None:
            calls.append(("", message.function_call.name, message.function_call.arguments))
        if calls:
            turn["tool_calls"] = [
                {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments_value(args)}}
                for call_id, name, args in calls
            ]
        if message.role in ("tool", "function"):
            turn["role"] = "tool"
            if message.tool_call_id:
                turn["tool_call_id"] = message.tool_call_id
                turn.setdefault("name", names.get(message.tool_call_id, ""))
        turns.append(turn)
    return turns


def fallback_turns(messages: Sequence[ChatMessage], plan: ToolPlan) -> list[dict[str, Any]]:
    """Messages for a template without tools: only system/user/assistant turns with string content."""
    turns: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        text = content_text(message.content, f"messages.{index}.content")
        role = "system" if message.role == "developer" else message.role
        if role in ("tool", "function"):
            block = f"<tool_response>\n{text}\n</tool_response>"
            if turns and turns[-1].get("_results"):
                turns[-1]["content"] += "\n" + block
            else:
                turns.append({"role": "user", "content": block, "_results": True})
            continue
        calls = [call_block(c.function.name, c.function.arguments) for c in message.tool_calls or ()]
        if message.function_call is not None:
            calls.append(call_block(message.function_call.name, message.function_call.arguments))
        if calls:
            text = "\n".join([text, *calls] if text else calls)
        turn: dict[str, Any] = {"role": role, "content": text}
        if message.name:
            turn["name"] = message.name
        turns.append(turn)
    for turn in turns:
        turn.pop("_results", None)
    if plan.offered():
        block = tools_system_prompt(plan)
        if turns and turns[0]["role"] == "system":
            turns[0]["content"] = f"{turns[0]['content']}\n\n{block}" if turns[0]["content"] else block
        else:
            turns.insert(0, {"role": "system", "content": block})
    return turns


def render_messages(tokenizer: PreTrainedTokenizerBase, messages: Sequence[ChatMessage], plan: ToolPlan) -> str:
    """The prompt: the model's own chat template (with tools where it takes them), or a plain
    'role: content' transcript for models without one. A template that refuses the conversation
    (e.g. roles that must alternate) is a 400 saying so."""
    native = template_supports_tools(tokenizer)
    turns = native_turns(messages) if native else fallback_turns(messages, plan)
    if not tokenizer.chat_template:
        return "".join(f"{turn['role']}: {turn['content']}\n" for turn in turns) + "assistant:"
    tools: list[dict[Any, Any] | Callable[..., Any]] | None = None
    if native:
        tools = [{"type": "function", "function": _function_spec(f)} for f in plan.offered()] or None
    try:
        return str(tokenizer.apply_chat_template(turns, tools=tools, tokenize=False, add_generation_prompt=True))
    except Exception as error:  # jinja's TemplateError and friends: the template's own rule
        raise InvalidRequestError(
            f"messages: the model's chat template refused this conversation ({error}).", param="messages"
        ) from None


def _function_spec(function: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"name": function.name, "parameters": function.parameters or {"type": "object"}}
    if function.description:
        spec["description"] = function.description
    return spec
