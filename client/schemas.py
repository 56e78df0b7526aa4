"""Varied JSON Schemas for structured-output tests and benchmarks, generated from a seed.

Each schema is an object with a few properties drawn from: strings (some with length bounds),
integers and numbers with bounds, booleans, enums, arrays (of scalars or objects, some with item
bounds) and nested objects, each property required or optional. ``schemas(count, seed)`` gives
the same list for the same arguments, so a failure can be replayed by its index.
"""

from __future__ import annotations

import random
from typing import Any

_WORDS = ["name", "city", "color", "size", "count", "price", "tags", "owner", "level", "items", "note", "score"]


def schemas(count: int, seed: int = 0) -> list[dict[str, Any]]:
    """``count`` object schemas, deterministic for a seed."""
    rng = random.Random(seed)
    return [_object(rng, depth=0) for _ in range(count)]


def _object(rng: random.Random, depth: int) -> dict[str, Any]:
    names = rng.sample(_WORDS, rng.randint(1, 4 if depth else 5))
    properties = {name: _value(rng, depth + 1) for name in names}
    required = [name for name in names if rng.random() < 0.7] or names[:1]
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


def _value(rng: random.Random, depth: int) -> dict[str, Any]:
    kinds = ["string", "bounded string", "integer", "number", "boolean", "enum"]
    if depth < 3:
        kinds += ["array", "object"]
    kind = rng.choice(kinds)
    if kind == "bounded string":
        return {"type": "string", "minLength": 1, "maxLength": rng.randint(3, 20)}
    if kind == "integer":
        low = rng.randint(-100, 100)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 1000)}
    if kind == "number":
        return {"type": "number", "minimum": 0, "maximum": rng.choice([1, 10.5, 1e6])}
    if kind == "enum":
        return {"type": "string", "enum": rng.sample(["red", "green", "blue", "small", "large", "yes", "no"], 3)}
    if kind == "array":
        items = _value(rng, depth + 1) if rng.random() < 0.8 else _object(rng, depth + 1)
        return {"type": "array", "items": items, "minItems": rng.randint(0, 2), "maxItems": rng.randint(2, 4)}
    if kind == "object":
        return _object(rng, depth)
    return {"type": kind}


def strict_format(index: int, schema: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's ``response_format.json_schema`` for a strict ``schema`` (named by its index)."""
    return {"name": f"s{index}", "schema": schema, "strict": True}
