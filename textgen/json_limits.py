"""How deeply JSON may nest before anything parses it.

Python's ``json`` (and anything that walks a decoded value recursively) raises ``RecursionError`` near
1,000 levels, and a 1 MiB body can nest 500,000 deep. No request this server accepts needs more than
a few dozen levels, so a body (or a batch line) nested deeper than ``MAX_JSON_DEPTH`` is refused with a
400 that names the limit, before it is parsed. The check is linear in the body and needs no parse:
strings are removed (brackets inside them do not count), then the running depth of the remaining
brackets is followed.
"""

from __future__ import annotations

import re
from itertools import accumulate

MAX_JSON_DEPTH = 200
DEPTH_MESSAGE = (
    f"The JSON body is nested too deeply: more than {MAX_JSON_DEPTH} levels of arrays and objects "
    "(this server's limit). Flatten the structure."
)

# A JSON string, escapes included, written so the regex engine never backtracks.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(range(256)).translate(None, b"[]{}")
_OPENERS = frozenset(b"[{")


def brackets_outside_strings(body: bytes) -> bytes:
    return _STRING.sub(b"", body).translate(None, _NOT_BRACKETS)


def json_too_deep(body: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether ``body`` nests arrays/objects more than ``limit`` deep (for text that is not valid JSON,
    a harmless over-estimate). Cheap when the body has at most ``limit`` opening brackets."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    brackets = brackets_outside_strings(body)
    if brackets.count(b"[") + brackets.count(b"{") <= limit:
        return False
    return max(accumulate(1 if byte in _OPENERS else -1 for byte in brackets)) > limit


def depth_check_is_slow(body: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether ``json_too_deep`` would walk the body byte by byte (callers on an event loop can then
    run it in a worker thread)."""
    return body.count(b"[") + body.count(b"{") > max(limit, 20_000)
