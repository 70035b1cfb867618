"""Structural limits on constraints, checked before anything is compiled (cheap, pure Python).

The grammar compiler's cost and stack depth grow with how deep a schema nests, how long a ``$ref``
chain runs and how many rules a grammar chains; past a point it crashes the process (see
``textgen.engine.constraints``). These checks refuse such inputs early with a 400 that names the limit
and how to get under it. Every limit sits well above what real schemas and grammars use (the tool
schemas of agent frameworks nest < 15 deep, with tens of definitions and chains of a few ``$ref`` s;
hand-written GBNF/Lark grammars have tens to a few hundred rules) and far below where llguidance
1.9.1 crashed on an 8 MiB stack (``$ref`` chains of ~1,000 definitions, ~2,800 chained Lark rules).

Every walk here is iterative (an explicit stack), so no input can exhaust Python's recursion either.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from textgen.errors import InvalidRequestError

MAX_SCHEMA_CHARS = 262_144  # canonical (compact) JSON of one schema
MAX_SCHEMA_DEPTH = 64  # JSON nesting of the schema document (objects and arrays)
MAX_SCHEMA_DEFINITIONS = 512  # entries of every $defs / definitions object, together
MAX_REF_CHAIN = 64  # $ref hops one after another (a ref into a subschema that holds a ref, ...)
MAX_REGEX_CHARS = 4_096
MAX_GRAMMAR_CHARS = 65_536
MAX_GRAMMAR_RULES = 1_000
MAX_GRAMMAR_DEPTH = 64  # nesting of ( ) and [ ] groups in one rule
MAX_CHOICE_CHARS = 65_536  # all the options of a choice together

_DEFINITION_KEYS = ("$defs", "definitions")
# A rule or terminal definition at the start of a line: Lark ``name:``, ``?name:``, ``name.2:``; GBNF ``name ::=``.
_RULE_START = re.compile(r"^[ \t]*[?!]?[A-Za-z_][A-Za-z0-9_.\-]*[ \t]*(::=|:)", re.MULTILINE)


def too_complex(field: str, what: str, limit: str, fix: str) -> InvalidRequestError:
    return InvalidRequestError(f"{field}: the {what} is over this server's limit ({limit}). {fix}")


# -- JSON schemas ------------------------------------------------------------------------------------


def json_depth_over(value: Any, limit: int) -> bool:
    """Whether ``value`` (parsed JSON) nests objects/arrays more than ``limit`` deep; stops early."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def _nesting_error(field: str) -> InvalidRequestError:
    return too_complex(
        field,
        "schema's nesting",
        f"{MAX_SCHEMA_DEPTH} levels of objects and arrays",
        "Flatten it, or move repeated parts into $defs and refer to them with $ref.",
    )


def check_schema_value(schema: Any, field: str = "json_schema") -> None:
    """The nesting limit on a schema as the request holds it (before it is serialised)."""
    if json_depth_over(schema, MAX_SCHEMA_DEPTH):
        raise _nesting_error(field)


def _walk(schema: Any) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every (JSON pointer as a tuple of tokens, node) of the document, root first."""
    stack: list[tuple[tuple[str, ...], Any]] = [((), schema)]
    while stack:
        path, node = stack.pop()
        yield path, node
        if isinstance(node, dict):
            stack.extend(((*path, str(key)), child) for key, child in node.items())
        elif isinstance(node, list):
            stack.extend(((*path, str(index)), child) for index, child in enumerate(node))


def _pointer(ref: str) -> tuple[str, ...] | None:
    """A local ``$ref`` ("#/$defs/a") as pointer tokens; None for a remote or malformed one."""
    if ref == "#":
        return ()
    if not ref.startswith("#/"):
        return None
    return tuple(token.replace("~1", "/").replace("~0", "~") for token in ref[2:].split("/"))


def longest_ref_chain(refs: list[tuple[tuple[str, ...], tuple[str, ...]]]) -> int:
    """The most $ref hops in a row: a hop goes from a ref to every ref inside the subschema it names.

    ``refs`` holds (where the ref is, what it names). A ref back into a subschema already on the chain
    (a recursive schema, which is legitimate) ends the chain there rather than counting forever."""
    inside: dict[tuple[str, ...], list[tuple[str, ...]]] = {}
    targets = {target for _, target in refs}
    for where, target in refs:
        for cut in range(len(where) + 1):  # every subschema enclosing this ref that some ref names
            enclosing = where[:cut]
            if enclosing in targets:
                inside.setdefault(enclosing, []).append(target)
    best: dict[tuple[str, ...], int] = {}
    on_chain: set[tuple[str, ...]] = set()
    longest = 0
    for start in targets:
        if start in best:
            continue
        stack: list[tuple[tuple[str, ...], Iterator[tuple[str, ...]]]] = [(start, iter(inside.get(start, ())))]
        on_chain.add(start)
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                on_chain.discard(node)
                best[node] = 1 + max((best.get(c, 0) for c in inside.get(node, ()) if c not in on_chain), default=0)
                longest = max(longest, best[node])
            elif child not in best and child not in on_chain:
                on_chain.add(child)
                stack.append((child, iter(inside.get(child, ()))))
    return longest


def check_schema(spec: str, field: str = "json_schema") -> None:
    """Size, nesting, definitions and $ref chains of a schema given as canonical JSON text."""
    if len(spec) > MAX_SCHEMA_CHARS:
        raise too_complex(
            field,
            "schema's size",
            f"{MAX_SCHEMA_CHARS:,} characters of compact JSON, this one has {len(spec):,}",
            "Send a smaller schema: drop descriptions and examples, and share repeated parts through $defs.",
        )
    if _text_depth(spec) > MAX_SCHEMA_DEPTH:
        raise _nesting_error(field)
    schema = json.loads(spec)
    definitions = 0
    refs: list[tuple[tuple[str, ...], tuple[str, ...]]] = []
    for path, node in _walk(schema):
        if not isinstance(node, dict):
            continue
        for key in _DEFINITION_KEYS:
            if isinstance(node.get(key), dict) and (not path or path[-1] not in ("properties",)):
                definitions += len(node[key])
        ref = node.get("$ref")
        if isinstance(ref, str) and (not path or path[-1] != "properties"):
            target = _pointer(ref)
            if target is not None:
                refs.append((path, target))
    if definitions > MAX_SCHEMA_DEFINITIONS:
        raise too_complex(
            field,
            "number of definitions",
            f"{MAX_SCHEMA_DEFINITIONS} entries in $defs/definitions, this schema has {definitions}",
            "Merge definitions that describe the same shape, or split the request.",
        )
    chain = longest_ref_chain(refs)
    if chain > MAX_REF_CHAIN:
        raise too_complex(
            field,
            "$ref chain",
            f"{MAX_REF_CHAIN} $ref hops in a row, this schema has {chain}",
            "Inline short definitions instead of chaining one $ref to the next.",
        )


def _text_depth(text: str) -> int:
    """The deepest nesting of [ and { in JSON text (outside strings), without parsing it."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


# -- regular expressions, choices, grammars ------------------------------------------------------------


def check_regex(pattern: str) -> None:
    if len(pattern) > MAX_REGEX_CHARS:
        raise too_complex(
            "regex",
            "pattern's length",
            f"{MAX_REGEX_CHARS:,} characters, this one has {len(pattern):,}",
            "Shorten the pattern, or use a json_schema or grammar for structured text.",
        )


def check_choice(spec: str) -> None:
    if len(spec) > MAX_CHOICE_CHARS:
        raise too_complex(
            "choice",
            "options' total length",
            f"{MAX_CHOICE_CHARS:,} characters",
            "Send fewer or shorter options.",
        )


def grammar_depth(text: str) -> int:
    """The deepest nesting of ( ) and [ ] groups outside string literals, regexes, character classes
    (GBNF ``[...]``) and comments."""
    gbnf = "::=" in text
    depth = deepest = 0
    i, n = 0, len(text)
    while i < n:
        char = text[i]
        if char == '"' or (char == "/" and not gbnf and text[i + 1 : i + 2] not in ("/", "")):
            i = _skip_quoted(text, i, char)
            continue
        if (char == "#" and gbnf) or (char == "/" and text[i + 1 : i + 2] == "/"):
            end = text.find("\n", i)
            i = n if end < 0 else end
            continue
        if char == "[" and gbnf:
            i = _skip_quoted(text, i, "]")
            continue
        if char in "([":
            depth += 1
            deepest = max(deepest, depth)
        elif char in ")]":
            depth = max(0, depth - 1)
        i += 1
    return deepest


def _skip_quoted(text: str, start: int, close: str) -> int:
    """The index after the literal that opens at ``start`` and ends at an unescaped ``close``."""
    i = start + 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == close or text[i] == "\n":
            return i + 1
        i += 1
    return i


def check_grammar(text: str) -> None:
    if len(text) > MAX_GRAMMAR_CHARS:
        raise too_complex(
            "grammar",
            "grammar's length",
            f"{MAX_GRAMMAR_CHARS:,} characters, this one has {len(text):,}",
            "Shorten the grammar.",
        )
    rules = len(_RULE_START.findall(text))
    if rules > MAX_GRAMMAR_RULES:
        raise too_complex(
            "grammar",
            "number of rules",
            f"{MAX_GRAMMAR_RULES:,} rules, this grammar has {rules:,}",
            "Merge rules (a chain of rules that each name the next can be one rule), or use a regex terminal.",
        )
    depth = grammar_depth(text)
    if depth > MAX_GRAMMAR_DEPTH:
        raise too_complex(
            "grammar",
            "nesting of groups",
            f"{MAX_GRAMMAR_DEPTH} levels of ( ) and [ ], this grammar has {depth}",
            "Name inner groups as rules of their own.",
        )


def check_constraint_limits(kind: str, spec: str) -> None:
    """InvalidRequestError naming the limit when a constraint is over one; nothing otherwise."""
    if kind in ("json_schema", "json_object"):
        check_schema(spec)
    elif kind == "regex":
        check_regex(spec)
    elif kind == "choice":
        check_choice(spec)
    elif kind == "grammar":
        check_grammar(spec)
