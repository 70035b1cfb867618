"""The inputs of issue 20 that crashed the server inside the grammar compiler (llguidance 1.9.1, 8 MiB
stack): a JSON schema whose $refs chain ~1,000 definitions (77 KB) and a Lark grammar chaining ~2,800
rules (34 KB). Offline thresholds there: 700-deep chains and 2,600 rules compiled, 1,000 and 2,800
crashed."""

from __future__ import annotations

from typing import Any


def deep_ref_schema(definitions: int = 1000) -> dict[str, Any]:
    """Each definition is an object whose one property refers to the next definition."""
    defs: dict[str, Any] = {
        f"d{i}": {"type": "object", "properties": {"next": {"$ref": f"#/$defs/d{i + 1}"}}} for i in range(definitions)
    }
    defs[f"d{definitions}"] = {"type": "string"}
    return {"$ref": "#/$defs/d0", "$defs": defs}


def chained_lark_grammar(rules: int = 2800) -> str:
    """``start`` names r0, each rule names the next, the last one is a literal."""
    return "\n".join(["start: r0", *(f"r{i}: r{i + 1}" for i in range(rules)), f'r{rules}: "x"'])
