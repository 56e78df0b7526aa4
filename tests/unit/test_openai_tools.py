"""Tools on models without tool calling: the grammar, the prompt's format and the parsing of calls."""

from __future__ import annotations

import pytest

from services.common.api.grammar import (
    FRACTION_STEP,
    NUMBER_BOUND,
    STRING_BOUND,
    bounded,
    get_grammar,
    json_schema_grammar,
)
from services.common.web.errors import InvalidParameter
from services.gateway.openai_tools import (
    Arguments,
    CallOpened,
    Content,
    ToolCallParser,
    call_text,
    parse_tool_choice,
    prompt_messages,
)

WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}


def test_tool_choice_modes():
    assert parse_tool_choice({}) is None
    assert parse_tool_choice({"tools": [WEATHER], "tool_choice": "none"}) is None
    assert parse_tool_choice({"tools": [WEATHER]}).mode == "auto"
    function = {"type": "function", "function": {"name": "get_weather"}}
    named = parse_tool_choice({"tools": [WEATHER], "tool_choice": function})
    assert (named.mode, named.named, named.parallel) == ("named", "get_weather", False)
    one = parse_tool_choice({"tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": False})
    assert one.mode == "required" and one.parallel is False
    for bad, param in (
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objec"}}}]},
         "tools[0].function.parameters"),
    ):  # fmt: skip
        with pytest.raises(InvalidParameter) as refused:
            parse_tool_choice(bad)
        assert refused.value.param == param


@pytest.mark.parametrize("piece", [1, 3, 1000])
def test_parser_splits_calls_whatever_the_pieces(piece):
    text = call_text("get_weather", '{"city":"Paris"}') + "\n" + call_text("get_weather", '{"city":"Rome"}')
    parser, events = ToolCallParser(), []
    for start in range(0, len(text), piece):
        events += list(parser.push(text[start : start + piece]))
    opened = [event for event in events if isinstance(event, CallOpened)]
    arguments = ["".join(e.text for e in events if isinstance(e, Arguments) and e.index == i) for i in range(2)]
    assert [call.name for call in opened] == ["get_weather"] * 2 and parser.calls == 2
    assert arguments == ['{"city":"Paris"}', '{"city":"Rome"}']
    assert len({call.id for call in opened}) == 2


def test_parser_passes_text_through():
    assert list(ToolCallParser().push("Hello <b>")) == [Content("Hello <b>")]


def test_prompt_messages_render_tools_calls_and_results():
    choice = parse_tool_choice({"tools": [WEATHER]})
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "c", "name": "get_weather", "arguments": "{}"}]},
        {"role": "tool", "content": "sunny"},
        {"role": "tool", "content": "warm"},
    ]
    rendered = prompt_messages(messages, choice)
    assert rendered[0]["role"] == "system" and '"name": "get_weather"' in rendered[0]["content"]
    assert rendered[2] == {"role": "assistant", "content": call_text("get_weather", "{}")}
    results = "<tool_response>\nsunny\n</tool_response>\n<tool_response>\nwarm\n</tool_response>"
    assert rendered[3] == {"role": "user", "content": results}
    assert len(rendered) == 4


def test_numbers_and_strings_without_bounds_get_them():
    schema = {"properties": {"n": {"type": "integer"}, "x": {"type": ["number", "null"], "minimum": 0}}}
    properties = bounded(schema)["properties"]
    assert (properties["n"]["minimum"], properties["n"]["maximum"]) == (-NUMBER_BOUND, NUMBER_BOUND)
    assert (properties["x"]["minimum"], properties["x"]["maximum"]) == (0, NUMBER_BOUND)
    assert properties["x"]["multipleOf"] == FRACTION_STEP and "multipleOf" not in properties["n"]
    assert bounded({"type": "number", "multipleOf": 0.5})["multipleOf"] == 0.5
    assert bounded({"properties": {"type": {"type": "string"}}}) == {
        "properties": {"type": {"type": "string", "maxLength": STRING_BOUND}}
    }
    assert bounded({"type": "string", "maxLength": 3}) == {"type": "string", "maxLength": 3}
    assert "maxLength" not in bounded({"type": "string", "format": "date"})
    assert bounded({"type": [{}, "integer"]})["maximum"] == NUMBER_BOUND


def test_unsupported_schemas_name_the_part():
    with pytest.raises(InvalidParameter, match="postal") as refused:
        json_schema_grammar({"type": "string", "format": "postal"}, "response_format.json_schema.schema")
    assert refused.value.param == "response_format.json_schema.schema"
    with pytest.raises(InvalidParameter, match="json_schema"):
        get_grammar({"json_schema": "{not json"})
    with pytest.raises(InvalidParameter, match="at most one"):
        get_grammar({"json_schema": {}, "grammar": "x"})
    assert get_grammar({"json_schema": '{"type": "object"}'}) == json_schema_grammar({"type": "object"}, "x")
    assert get_grammar({}) is None
