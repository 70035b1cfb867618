"""Seeded random JSON schemas for the structured-output tests (tiny model, bundled model).

Every schema bounds its output (maxLength, maxItems, integer ranges, ``additionalProperties: false``)
so that a model with random weights still finishes well inside the token budget; numbers get
bounds too, as the issue asks.
"""

from __future__ import annotations

import random
from typing import Any

WORDS = ["alpha", "beta", "gamma", "delta", "red", "green", "blue", "yes", "no", "maybe"]


def _name(rng: random.Random, taken: set[str]) -> str:
    while True:
        name = rng.choice(WORDS) + ("" if rng.random() < 0.6 else str(rng.randint(0, 9)))
        if name not in taken:
            taken.add(name)
            return name


def random_leaf(rng: random.Random) -> dict[str, Any]:
    kind = rng.choice(["string", "integer", "number", "boolean", "enum"])
    if kind == "string":
        return {"type": "string", "maxLength": rng.randint(1, 8)}
    if kind == "integer":
        low = rng.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 500)}
    if kind == "number":
        low = rng.randint(-10, 10)
        return {"type": "number", "minimum": low, "maximum": low + rng.randint(1, 100)}
    if kind == "boolean":
        return {"type": "boolean"}
    return {"enum": rng.sample(WORDS, rng.randint(1, 4))}


def random_schema(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    """An object schema with leaves, enums, arrays and (up to two levels of) nested objects."""
    taken: set[str] = set()
    properties: dict[str, Any] = {}
    for _ in range(rng.randint(1, 4)):
        roll = rng.random()
        if roll < 0.2 and depth < 2:
            value = random_schema(rng, depth + 1)
        elif roll < 0.4:
            value = {"type": "array", "items": random_leaf(rng), "minItems": 0, "maxItems": rng.randint(1, 3)}
        else:
            value = random_leaf(rng)
        properties[_name(rng, taken)] = value
    required = [name for name in properties if rng.random() < 0.6]
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


def random_schemas(count: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [random_schema(rng) for _ in range(count)]
