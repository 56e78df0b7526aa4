"""Grammars that constrain a generation's output, in llguidance's form (shared by gateway and inference).

A request may carry a ``grammar``: an llguidance grammar (its JSON form, as
``LLMatcher.grammar_from_*`` writes it) that the replica enforces token by token
(services/inference/constraint.py), so the output always matches it. The public APIs build one
from a JSON Schema (v2's ``json_schema``, OpenAI's ``response_format``) or from a Lark grammar
(OpenAI's ``tools``, services/gateway/openai_tools.py). JSON is written compactly (no free
whitespace): a small model cannot then pad an answer with blank lines up to its token limit.
Numbers and strings without bounds get them (``NUMBER_BOUND``, ``FRACTION_STEP``, ``STRING_BOUND``):
a small model that wants to write a field the schema forbids otherwise writes digits (before or
after the point) until its token limit instead, and one that loops inside a string never closes it.
Each grammar is checked here, where it arrives: what llguidance cannot compile (an unknown type, format or keyword) is
refused with its message and the parameter that holds it.
"""

from __future__ import annotations

import json
from typing import Any

from services.common.web.errors import InvalidParameter

JSON_OPTIONS = {"whitespace_flexible": False}
NUMBER_BOUND = 10**15  # the magnitude of a number whose schema sets no bound: 16 digits at most
FRACTION_STEP = 1e-6  # the multipleOf of a number whose schema sets none: 6 digits after the point at most
STRING_BOUND = 256  # the characters of a string whose schema sets no maxLength (nor pattern, format, enum)
_NUMBER_TYPES = {"integer", "number"}


def json_schema_grammar(schema: Any, param: str) -> str:
    """The grammar of JSON documents valid against ``schema`` (a JSON Schema object); checked."""
    from llguidance import LLMatcher

    if not isinstance(schema, dict):
        raise InvalidParameter(f"{param} must be a JSON Schema object", param=param)
    try:
        grammar = LLMatcher.grammar_from_json_schema(bounded(schema), defaults=JSON_OPTIONS)
    except ValueError as error:
        raise InvalidParameter(f"{param} is not supported: {error}", param=param) from None
    return checked(grammar, param)


def bounded(schema: Any) -> Any:
    """``schema`` with ``NUMBER_BOUND`` on either side of every number or integer that has none there,
    ``FRACTION_STEP`` as the ``multipleOf`` of every number that has none, and ``STRING_BOUND`` as the
    ``maxLength`` of every free string that has none."""
    if isinstance(schema, list):
        return [bounded(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    copy = {key: bounded(value) for key, value in schema.items()}
    types = schema.get("type")
    types = (
        {types}
        if isinstance(types, str)
        else {t for t in types if isinstance(t, str)}
        if isinstance(types, list)
        else set()
    )
    if types & _NUMBER_TYPES and "enum" not in schema and "const" not in schema:
        if "minimum" not in schema and "exclusiveMinimum" not in schema:
            copy["minimum"] = -NUMBER_BOUND
        if "maximum" not in schema and "exclusiveMaximum" not in schema:
            copy["maximum"] = NUMBER_BOUND
        if "number" in types and "multipleOf" not in schema:
            copy["multipleOf"] = FRACTION_STEP
    if "string" in types and not {"maxLength", "pattern", "format", "enum", "const"} & schema.keys():
        copy["maxLength"] = STRING_BOUND
    return copy


def lark_grammar(lark: str, param: str) -> str:
    """The grammar of a Lark text (llguidance's dialect, ``%json`` included); checked."""
    from llguidance import LLMatcher

    return checked(LLMatcher.grammar_from_lark(lark), param)


def checked(grammar: str, param: str) -> str:
    """``grammar`` if llguidance compiles it; InvalidParameter naming ``param`` and the part otherwise."""
    from llguidance import LLMatcher

    error = LLMatcher.validate_grammar(grammar)
    if error:
        raise InvalidParameter(f"{param} is not supported: {error.strip().splitlines()[0]}", param=param)
    return grammar


def get_grammar(values: dict[str, Any]) -> str | None:
    """A request's constraint: ``grammar`` (llguidance's JSON form, from the gateway) or ``json_schema``
    (a JSON Schema, as an object or its JSON text: the v1/v2 parameter); None when neither is given."""
    grammar, schema = values.get("grammar"), values.get("json_schema")
    if grammar not in (None, ""):
        if schema not in (None, ""):
            raise InvalidParameter("Set at most one of grammar or json_schema", param="json_schema")
        if not isinstance(grammar, str):
            raise InvalidParameter("grammar must be a string", param="grammar")
        return checked(grammar, "grammar")
    if schema in (None, ""):
        return None
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError:
            message = "json_schema must be a JSON Schema object or its JSON text"
            raise InvalidParameter(message, param="json_schema") from None
    return json_schema_grammar(schema, "json_schema")
