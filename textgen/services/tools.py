"""Tool calling on chat completions: which functions a request offers and how the model must answer
(``ToolPlan``), the grammar that holds the model to valid calls (``tool_call_constraint``), and the parser
that turns generated text back into OpenAI's ``tool_calls`` (``ToolCallParser``, streaming or at once).

The call format. Whatever the chat template, the model writes each call as a Hermes-style block, the
convention most tool-trained open models (Qwen, Hermes, SmolLM3) use::

    <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>

How each ``tool_choice`` is enforced (llguidance Lark grammars, compiled by the engine's ordinary
constraint machinery, ``textgen.engine.constraints``):

- ``required``: ``start: block{1,8}`` (one block when parallel calls are off): nothing but calls.
- named function: exactly one call of that function (as OpenAI's and vLLM's forced function: clients such
  as instructor read the one call), whatever ``parallel_tool_calls`` says.
- ``auto``: ``start: TEXT | OPEN call ...``, where ``TEXT`` is any non-empty text that never contains
  ``<tool_call>`` and ``OPEN`` is any text ending at the first ``<tool_call>``. While the model writes
  prose both lexemes stay alive and the mask refuses nothing (the text is free); the moment the marker is
  complete the grammar takes over and the rest must be a valid call. Why a grammar with both branches
  rather than llguidance's lazy (triggered) grammars: it needs nothing of the engine beyond what
  structured output already does (one constraint per row from the first token), llguidance 1.9.1 lexes
  the negated/intersected regexes above as one lexer state (measured: no refused prose, the call forced
  from the marker on), and the text before the marker comes back as ``content``.
- ``none``: the tools are not shown to the model and nothing is constrained.

Inside a call, the arguments are an inline ``%json`` schema: the function's own ``parameters``, so the
arguments always parse and validate (for the JSON-schema features llguidance supports; the schema is
checked against the same limits as ``response_format`` schemas before anything runs).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from textgen.engine.constraint_limits import MAX_GRAMMAR_CHARS, check_schema, check_schema_value
from textgen.engine.constraints import Constraint
from textgen.errors import InvalidRequestError
from textgen.services.requests import ChatCompletionRequest, FunctionDefinition, NamedFunction, NamedToolChoice

# The most calls one answer may hold when parallel calls are allowed: a small model, once it has called,
# tends to repeat the call until its token budget runs out; the grammar ends the answer here instead.
MAX_PARALLEL_CALLS = 8
TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
NO_ARGUMENTS_SCHEMA: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}
# The grammar's JSON is compact (llguidance's default for an inline %json is flexible whitespace, which a
# small model can fill with newlines until its budget is gone).
_COMPACT = {"whitespace_flexible": False}

# A number the schema leaves open is written with at most this many decimals (no exponent): a small model
# sampling at temperature 1 can otherwise run a fraction's digits on until its budget, and a cut-off call
# is no call. The result still validates against the function's own schema (this only narrows it).
NUMBER_STEP = 0.000001
_DATA_KEYWORDS = frozenset({"enum", "const", "default", "examples", "example"})
_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})
_OTHER_KEYS_KEYWORDS = frozenset({"additionalProperties", "patternProperties", "unevaluatedProperties"})

ToolMode = Literal["none", "auto", "required", "named"]


@dataclass(frozen=True)
class ToolPlan:
    """What a chat request offers the model and what it demands of the answer.

    ``legacy``: the request used ``functions``/``function_call``, so the answer is one
    ``message.function_call`` (finish_reason ``function_call``), as OpenAI's legacy API answers."""

    functions: tuple[FunctionDefinition, ...] = ()
    mode: ToolMode = "none"
    named: str | None = None
    parallel: bool = True
    legacy: bool = False

    @property
    def active(self) -> bool:
        """The model is offered tools and may (or must) call them."""
        return self.mode != "none" and bool(self.functions)

    @property
    def choice_field(self) -> str:
        return "function_call" if self.legacy else "tool_choice"

    def parameters_field(self, index: int) -> str:
        return f"functions.{index}.parameters" if self.legacy else f"tools.{index}.function.parameters"

    def offered(self) -> tuple[FunctionDefinition, ...]:
        """The functions the model is told about (none with tool_choice none)."""
        return self.functions if self.active else ()

    def callable(self) -> tuple[FunctionDefinition, ...]:
        """The functions the grammar lets the model call."""
        if self.mode == "named":
            return tuple(f for f in self.functions if f.name == self.named)
        return self.offered()


NO_TOOLS = ToolPlan()


def check_answer_format(plan: ToolPlan, format_type: str | None, field: str = "response_format") -> None:
    """A 400 naming ``field`` (``response_format``, or the Responses API's ``text.format``) when it asks for
    a JSON answer that ``tool_choice`` required or a named function rules out: such an answer is only tool
    calls, whose arguments follow each function's ``parameters``, so the format could not be honoured and
    would otherwise be silently ignored. (With ``auto`` it shapes the text answer; with ``none`` the whole one.)"""
    if format_type in (None, "text") or not plan.active or plan.mode not in ("required", "named"):
        return
    forced = f"the named function {plan.named!r}" if plan.mode == "named" else "required"
    raise InvalidRequestError(
        f"{field}: {format_type} cannot be honoured with {plan.choice_field} {forced}: the answer is then only "
        "tool calls, whose arguments follow each function's parameters. Put the schema in the function's "
        f"parameters and drop {field}, or use {plan.choice_field} auto (a text answer then follows {field}).",
        param=field,
    )


def parameters_schema(function: FunctionDefinition) -> dict[str, Any]:
    return function.parameters if function.parameters is not None else NO_ARGUMENTS_SCHEMA


def _check_parameters(plan_field: str, schema: dict[str, Any]) -> None:
    """The structural limits every constraint schema passes, and OpenAI's rule that arguments are an object."""
    declared = schema.get("type")
    if declared is not None and declared != "object" and not (isinstance(declared, list) and "object" in declared):
        raise InvalidRequestError(
            f"{plan_field}: a function's parameters must be a JSON schema of an object (type 'object'), "
            f"not {declared!r}; wrap the value in an object property.",
            param=plan_field,
        )
    try:
        check_schema_value(schema, plan_field)
        check_schema(json.dumps(schema, sort_keys=True, separators=(",", ":")), plan_field)
    except InvalidRequestError as error:
        raise InvalidRequestError(error.message, param=plan_field) from None


def _choice(body: ChatCompletionRequest, legacy: bool) -> tuple[ToolMode | None, str | None]:
    choice: Any = body.function_call if legacy else body.tool_choice
    if choice is None:
        return None, None
    if isinstance(choice, NamedToolChoice):
        return "named", choice.function.name
    if isinstance(choice, NamedFunction):
        return "named", choice.name
    mode: ToolMode = choice
    return mode, None


def tool_plan(body: ChatCompletionRequest) -> ToolPlan:
    """The request's tools and tool_choice (or legacy functions and function_call), checked: a 400
    naming the field for a conflict, a duplicate name, an unknown named function or a schema over the
    limits."""
    # Cached on the request (every choice, the prompt and each response read it), keyed by the fields it
    # comes from, so a copy of the request with other tools or another tool_choice gets its own plan.
    key = (id(body.tools), id(body.functions), id(body.tool_choice), id(body.function_call), body.parallel_tool_calls)
    cached: tuple[Any, ToolPlan] | None = body.__dict__.get("_tool_plan")
    if cached is not None and cached[0] == key:
        return cached[1]
    plan = _resolve(body)
    body.__dict__["_tool_plan"] = (key, plan)
    return plan


def _resolve(body: ChatCompletionRequest) -> ToolPlan:
    if body.tools is not None and body.functions is not None:
        raise InvalidRequestError("functions: send tools or the legacy functions, not both.", param="functions")
    if body.tool_choice is not None and body.function_call is not None:
        raise InvalidRequestError(
            "function_call: send tool_choice or the legacy function_call, not both.", param="function_call"
        )
    legacy = body.functions is not None or (body.tools is None and body.function_call is not None)
    functions = tuple(body.functions or []) if legacy else tuple(t.function for t in body.tools or [])
    seen: set[str] = set()
    for index, function in enumerate(functions):
        name_field = f"functions.{index}.name" if legacy else f"tools.{index}.function.name"
        if function.name in seen:
            raise InvalidRequestError(
                f"{name_field}: two functions are named {function.name!r}; give each a distinct name.", param=name_field
            )
        seen.add(function.name)
    plan = ToolPlan(functions=functions, legacy=legacy)
    for index, function in enumerate(functions):
        _check_parameters(plan.parameters_field(index), parameters_schema(function))
    mode, named = _choice(body, legacy)
    choice_field = plan.choice_field
    if mode is None:
        mode = "auto" if functions else "none"
    if mode in ("required", "named") and not functions:
        raise InvalidRequestError(
            f"{choice_field}: {'a named function' if mode == 'named' else 'required'} needs "
            f"{'functions' if legacy else 'tools'}; this request offers none. Add the function definitions.",
            param=choice_field,
        )
    if mode == "named" and named not in seen:
        known = ", ".join(sorted(seen))
        raise InvalidRequestError(
            f"{choice_field}: no function named {named!r} among this request's "
            f"{'functions' if legacy else 'tools'} ({known}).",
            param=choice_field,
        )
    # A named function is one call (what forcing a function means to OpenAI's clients); legacy calls are one.
    parallel = False if legacy or mode == "named" else (body.parallel_tool_calls is not False)
    return ToolPlan(functions=functions, mode=mode, named=named, parallel=parallel, legacy=legacy)


# -- the grammar ---------------------------------------------------------------------------------------------


def _lark_string(text: str) -> str:
    """A Lark string literal (Lark strings take JSON's escapes)."""
    return json.dumps(text)


def bounded_numbers(schema: Any) -> Any:
    """A copy of a schema whose open numbers (``type: number`` without ``multipleOf``) take at most six
    decimals; data inside ``enum``/``const``/``default``/``examples`` is left as it is. (Recursion is
    safe: the schema's nesting passed the limits first.)"""
    if isinstance(schema, list):
        return [bounded_numbers(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    copy = {key: value if key in _DATA_KEYWORDS else bounded_numbers(value) for key, value in schema.items()}
    kind = schema.get("type")
    is_number = kind == "number" or (isinstance(kind, list) and "number" in kind)
    if is_number and "multipleOf" not in schema:
        copy["multipleOf"] = NUMBER_STEP
    return copy


def declared_arguments_only(schema: Any) -> Any:
    """A copy of a parameters schema in which an object that declares ``properties`` and says nothing of
    other keys (no ``additionalProperties``, ``patternProperties`` or ``unevaluatedProperties``) takes no
    others. JSON Schema would allow undeclared keys there, but a function has no use for arguments it does
    not declare (a framework's call with them fails its own validation), and a small model offered the
    freedom writes keys of its own until its budget runs out: a cut-off call is no call. The result still
    validates against the function's schema (this only narrows it). A schema with ``allOf`` anywhere is
    left as it is: closing the parts of an intersection could leave no object that satisfies all of them.
    Data inside ``enum``/``const``/``default``/``examples`` is left as it is; recursion is safe (the
    schema's nesting passed the limits first)."""
    if _mentions_all_of(schema):
        return schema
    return _closed(schema)


def _closed(schema: Any) -> Any:
    if isinstance(schema, list):
        return [_closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    copy = {key: _closed_value(key, value) for key, value in schema.items()}
    if isinstance(schema.get("properties"), dict) and not _OTHER_KEYS_KEYWORDS & schema.keys():
        copy["additionalProperties"] = False
    return copy


def _closed_value(key: str, value: Any) -> Any:
    if key in _DATA_KEYWORDS:
        return value
    if key in _SCHEMA_MAPS and isinstance(value, dict):  # names -> schemas: a name is not a keyword
        return {name: _closed(subschema) for name, subschema in value.items()}
    return _closed(value)


def _mentions_all_of(schema: Any) -> bool:
    if isinstance(schema, list):
        return any(_mentions_all_of(item) for item in schema)
    if not isinstance(schema, dict):
        return False
    return "allOf" in schema or any(
        _mentions_all_of(value) for key, value in schema.items() if key not in _DATA_KEYWORDS
    )


def _call_rule(index: int, function: FunctionDefinition) -> str:
    head = _lark_string(f'{{"name": "{function.name}", "arguments": ')
    schema = {**bounded_numbers(declared_arguments_only(parameters_schema(function))), "x-guidance": _COMPACT}
    return f"call_{index}: {head} %json {json.dumps(schema, separators=(',', ':'))} {_lark_string('}')}"


def tool_call_grammar(plan: ToolPlan, text_answer: dict[str, Any] | None = None) -> str:
    """The Lark grammar for the plan's answers. ``text_answer``: a JSON schema the non-call answer must
    follow (``response_format`` with ``auto``)."""
    functions = plan.callable()
    rules = [_call_rule(index, function) for index, function in enumerate(functions)]
    open_, close = _lark_string(TOOL_CALL_OPEN), _lark_string(TOOL_CALL_CLOSE)
    more = f" (NL? block){{0,{MAX_PARALLEL_CALLS - 1}}}" if plan.parallel else ""
    if plan.mode == "auto":
        if text_answer is not None:
            answer = f"%json {json.dumps({**text_answer, 'x-guidance': _COMPACT}, separators=(',', ':'))}"
            start = f"start: answer | block{more}\nanswer: {answer}"
        else:
            start = f"start: TEXT | OPEN NL? call NL? {close}{more}"
    else:
        start = f"start: block{more}"
    lines = [
        start,
        f"block: {open_} NL? call NL? {close}",
        "call: " + " | ".join(f"call_{index}" for index in range(len(functions))),
        *rules,
        r"NL: /\n/",
        # Any text without the marker; any text that ends at the first marker (see the module docstring).
        r"TEXT: /(?s:.+)/ & ~/(?s:.*<tool_call>.*)/",
        r"OPEN: /(?s:.*)<tool_call>/ & ~/(?s:.*<tool_call>.+)/",
    ]
    return "\n".join(lines) + "\n"


def tool_call_constraint(plan: ToolPlan, text_answer: dict[str, Any] | None = None) -> Constraint | None:
    """The constraint that holds the model to the plan; None when it offers no tools."""
    if not plan.active:
        return None
    grammar = tool_call_grammar(plan, text_answer)
    if len(grammar) > MAX_GRAMMAR_CHARS:
        field_name = "functions" if plan.legacy else "tools"
        raise InvalidRequestError(
            f"{field_name}: the functions' parameter schemas together make a call grammar of {len(grammar):,} "
            f"characters, over this server's limit ({MAX_GRAMMAR_CHARS:,}). Offer fewer or smaller functions "
            "(descriptions inside the schemas count too).",
            param=field_name,
        )
    return Constraint.grammar(grammar)


# -- the system-prompt fallback -------------------------------------------------------------------------------


def tools_system_prompt(plan: ToolPlan) -> str:
    """The tool block for chat templates that take no ``tools`` (the documented fallback). Compact: every
    request pays for it in prompt tokens (about 20 plus each function's JSON)."""
    listed = "\n".join(
        json.dumps(
            {"name": f.name, "description": f.description or "", "parameters": parameters_schema(f)},
            ensure_ascii=False,
            separators=(",", ":"),
        )
        for f in plan.offered()
    )
    rules = {
        "auto": "Answer in text, or call functions when they help.",
        "required": "You must call a function.",
        "named": f"You must call {plan.named}.",
    }[plan.mode if plan.mode != "none" else "auto"]
    count = "one block per call" if plan.parallel else "one block"
    return (
        f"# Tools\n<tools>\n{listed}\n</tools>\n"
        f'To call a function, write {TOOL_CALL_OPEN}{{"name": <name>, "arguments": <JSON object>}}{TOOL_CALL_CLOSE}, '
        f"{count}, then stop. {rules}"
    )


def call_block(name: str, arguments: str) -> str:
    """An earlier call as the model would have written it (the fallback's rendering of assistant turns)."""
    return f'{TOOL_CALL_OPEN}{{"name": "{name}", "arguments": {arguments_json(arguments)}}}{TOOL_CALL_CLOSE}'


def arguments_json(arguments: str) -> str:
    """A client's arguments string as JSON text: itself when it is JSON, else quoted."""
    try:
        return json.dumps(json.loads(arguments), ensure_ascii=False, separators=(", ", ": "))
    except ValueError:
        return json.dumps(arguments, ensure_ascii=False)


def arguments_value(arguments: str) -> Any:
    """A client's arguments as the value chat templates expect (a dict), or the string if it is not JSON."""
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


# -- reading calls back ---------------------------------------------------------------------------------------

_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"([A-Za-z0-9_-]{1,64})"\s*,\s*"arguments"\s*:\s*')
_TAIL = re.compile(r"\s*\}\s*" + re.escape(TOOL_CALL_CLOSE))
_MAX_HEAD_CHARS = 160  # a head longer than this without matching is not a call


@dataclass
class ParsedCall:
    id: str
    name: str
    arguments: str = ""
    complete: bool = False


@dataclass(frozen=True)
class CallStart:
    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ArgumentsDelta:
    index: int
    text: str


@dataclass(frozen=True)
class ContentDelta:
    text: str


ParseEvent = CallStart | ArgumentsDelta | ContentDelta


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCallParser:
    """Splits generated text into content and calls as it arrives. Text before the first marker is content
    (a suffix that could be the start of a marker is held back until it is decided); each call yields a
    ``CallStart`` once its name is known, then its arguments' text as it comes. Arguments end where their
    JSON object closes (strings and escapes tracked), so any text inside string values is safe."""

    content: str = ""
    calls: list[ParsedCall] = field(default_factory=list)
    _state: Literal["text", "head", "args", "tail", "between", "broken"] = "text"
    _pending: str = ""
    _depth: int = 0
    _in_string: bool = False
    _escaped: bool = False

    def feed(self, text: str) -> list[ParseEvent]:
        self._pending += text
        events: list[ParseEvent] = []
        while self._step(events):
            pass
        return events

    def finish(self) -> list[ParseEvent]:
        """The end of the text: held-back content is released; an unfinished call stays incomplete."""
        events: list[ParseEvent] = []
        if self._state in ("text", "broken") and self._pending:
            events.append(self._content(self._pending))
        self._pending = ""
        return events

    @property
    def complete_calls(self) -> list[ParsedCall]:
        return [call for call in self.calls if call.complete]

    def _content(self, text: str) -> ContentDelta:
        self.content += text
        return ContentDelta(text)

    def _step(self, events: list[ParseEvent]) -> bool:
        """One transition; False when it needs more text."""
        pending = self._pending
        if self._state in ("text", "between"):
            if self._state == "between":
                stripped = pending.lstrip(" \n")
                if not stripped:
                    return False
                if not stripped.startswith(TOOL_CALL_OPEN) and not TOOL_CALL_OPEN.startswith(stripped):
                    self._state = "text"  # prose after the calls (only when nothing constrained the model)
                    return True
                pending = stripped
            at = pending.find(TOOL_CALL_OPEN)
            if at >= 0:
                if at and self._state == "text":
                    events.append(self._content(pending[:at]))
                self._pending = pending[at + len(TOOL_CALL_OPEN) :]
                self._state = "head"
                return True
            if self._state == "text":
                keep = _marker_prefix_length(pending)
                if len(pending) > keep:
                    events.append(self._content(pending[: len(pending) - keep]))
                self._pending = pending[len(pending) - keep :]
            else:
                self._pending = pending
            return False
        if self._state == "head":
            match = _HEAD.match(pending)
            if match is None:
                if len(pending) > _MAX_HEAD_CHARS or (pending.strip() and not pending.lstrip().startswith("{")):
                    self._break()
                    return True
                return False
            call = ParsedCall(id=new_call_id(), name=match.group(1))
            self.calls.append(call)
            events.append(CallStart(len(self.calls) - 1, call.id, call.name))
            self._pending = pending[match.end() :]
            self._state, self._depth, self._in_string, self._escaped = "args", 0, False, False
            return bool(self._pending)
        if self._state == "args":
            if not self.calls[-1].arguments:
                pending = pending.lstrip()  # the head's trailing space may arrive in the next piece
                if not pending:
                    self._pending = ""
                    return False
            end = self._scan(pending)
            piece = pending if end is None else pending[:end]
            if piece:
                self.calls[-1].arguments += piece
                events.append(ArgumentsDelta(len(self.calls) - 1, piece))
            if end is None:
                self._pending = ""
                return False
            self._pending = pending[end:]
            self._state = "tail"
            return True
        if self._state == "tail":
            match = _TAIL.match(pending)
            if match is None:
                return False
            self.calls[-1].complete = True
            self._pending = pending[match.end() :]
            self._state = "between"
            return bool(self._pending)
        return False  # broken: everything stays pending until finish()

    def _scan(self, text: str) -> int | None:
        """Where the arguments object closes in ``text`` (the index after its ``}``), or None."""
        for position, char in enumerate(text):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == '"':
                    self._in_string = False
            elif char == '"':
                self._in_string = True
            elif char in "{[":
                self._depth += 1
            elif char in "}]":
                self._depth -= 1
                if self._depth <= 0:
                    return position + 1
            elif self._depth == 0 and not char.isspace():
                return position  # not an object: a scalar argument ends at the first structural char
        return None

    def _break(self) -> None:
        """Text after a marker that is not a call (only possible unconstrained): it is content, marker included."""
        self._pending = TOOL_CALL_OPEN + self._pending
        self._state = "broken"


def _marker_prefix_length(text: str) -> int:
    """The longest suffix of ``text`` that is a proper prefix of the call marker."""
    for length in range(min(len(text), len(TOOL_CALL_OPEN) - 1), 0, -1):
        if TOOL_CALL_OPEN.startswith(text[-length:]):
            return length
    return 0


def parse_tool_calls(text: str) -> ToolCallParser:
    parser = ToolCallParser()
    parser.feed(text)
    parser.finish()
    return parser
