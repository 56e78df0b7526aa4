"""Validation of OpenAI-style bodies (no services needed)."""

from __future__ import annotations

import pytest

from services.common.api.params import Limits
from services.common.web.errors import InvalidParameter, PayloadTooLarge
from services.gateway.openai_params import parse_chat, parse_completion

LIMITS = Limits(max_input_chars=100, max_new_tokens=50)


def test_completion_defaults_follow_openai():
    prompt, options = parse_completion({"model": "m", "prompt": ["Hi"]}, LIMITS)
    assert prompt == "Hi"
    assert (options.max_tokens, options.temperature, options.top_p, options.stream) == (16, 1.0, 1.0, False)


def test_chat_accepts_text_parts_and_developer_role():
    messages, options = parse_chat(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
            ],
            "max_completion_tokens": 5,
            "stop": "END",
            "stream_options": {"include_usage": True},
        },
        LIMITS,
    )
    assert messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    assert (options.max_tokens, options.stop, options.include_usage) == (5, ("END",), True)
    assert options.max_tokens == 5


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "Hi"}, "model"),
        ({"model": "m", "prompt": ""}, "prompt"),
        ({"model": "m", "prompt": "Hi", "max_tokens": 51}, "max_tokens"),
        ({"model": "m", "prompt": "Hi", "max_tokens": True}, "max_tokens"),
        ({"model": "m", "prompt": "Hi", "temperature": "hot"}, "temperature"),
        ({"model": "m", "prompt": "Hi", "temperature": float("nan")}, "temperature"),
        ({"model": "m", "prompt": "Hi", "seed": -1}, "seed"),
        ({"model": "m", "prompt": "Hi", "stream": "yes"}, "stream"),
        ({"model": "m", "prompt": "Hi", "echo": "yes"}, "echo"),
        ({"model": "m", "prompt": "Hi", "presence_penalty": 2.5}, "presence_penalty"),
        ({"model": "m", "prompt": "Hi", "frequency_penalty": -2.01}, "frequency_penalty"),
        ({"model": "m", "prompt": "Hi", "logprobs": 6}, "logprobs"),
        ({"model": "m", "prompt": "Hi", "n": 5}, "n"),
        ({"model": "m", "prompt": "Hi", "n": 0}, "n"),
        ({"model": "m", "prompt": "Hi", "n": 3, "best_of": 2}, "best_of"),
        ({"model": "m", "prompt": "Hi", "best_of": 5}, "best_of"),
        ({"model": "m", "prompt": "Hi", "best_of": 2, "stream": True}, "best_of"),
        ({"model": "m", "prompt": "Hi", "logit_bias": {"5": 101}}, "logit_bias"),
        ({"model": "m", "prompt": "Hi", "logit_bias": {"x": 1}}, "logit_bias"),
        ({"model": "m", "prompt": "Hi", "logit_bias": {"-1": 1}}, "logit_bias"),
        ({"model": "m", "prompt": "Hi", "logit_bias": {"5": "1"}}, "logit_bias"),
        ({"model": "m", "prompt": "Hi", "logit_bias": [1]}, "logit_bias"),
        ({"model": "m", "prompt": "Hi", "stop": [""]}, "stop"),
    ],
)
def test_bad_completion_fields_are_named(body, param):
    with pytest.raises(InvalidParameter) as raised:
        parse_completion(body, LIMITS)
    assert raised.value.param == param


def test_too_long_prompt_is_413():
    with pytest.raises(PayloadTooLarge):
        parse_completion({"model": "m", "prompt": "x" * 101}, LIMITS)


def test_malformed_tools_and_legacy_functions_are_refused():
    body = {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}
    with pytest.raises(InvalidParameter, match="function") as refused:
        parse_chat({**body, "tools": [{"type": "function"}]}, LIMITS)
    assert refused.value.param == "tools[0]"
    with pytest.raises(InvalidParameter, match="use tools") as refused:
        parse_chat({**body, "functions": [{"name": "f"}]}, LIMITS)
    assert refused.value.param == "functions"


def test_response_format_becomes_a_grammar_on_both_endpoints():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    json_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    for kind in ({"type": "json_object"}, json_schema):
        messages = [{"role": "user", "content": "Hi"}]
        chat = parse_chat({"model": "m", "messages": messages, "response_format": kind}, LIMITS)
        completion = parse_completion({"model": "m", "prompt": "Hi", "response_format": kind}, LIMITS)
        assert chat[1].grammar and chat[1].grammar == completion[1].grammar
    text = parse_completion({"model": "m", "prompt": "Hi", "response_format": {"type": "text"}}, LIMITS)
    assert text[1].grammar is None


def test_tool_messages_are_accepted():
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "42"},
    ]
    parsed, _ = parse_chat({"model": "m", "messages": messages}, LIMITS)
    calls = [{"id": "call_1", "name": "f", "arguments": '{"a":1}'}]
    assert parsed[1] == {"role": "assistant", "content": "", "tool_calls": calls}
    assert parsed[2] == {"role": "tool", "content": "42"}


def test_repetition_penalty_is_accepted_within_its_range():
    body = {"model": "m", "prompt": "Hi", "repetition_penalty": 1.3}
    assert parse_completion(body, Limits())[1].repetition_penalty == 1.3
    assert parse_completion({"model": "m", "prompt": "Hi"}, Limits())[1].repetition_penalty is None
    for bad in (0, -1, 11, "1.2", True):
        with pytest.raises(InvalidParameter) as refused:
            parse_completion({**body, "repetition_penalty": bad}, Limits())
        assert refused.value.param == "repetition_penalty"


CHAT = {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}


def test_scores_choices_and_shaping_are_read():
    _, options = parse_completion(
        {"model": "m", "prompt": "Hi", "logprobs": 2, "echo": True, "n": 2, "best_of": 3, "presence_penalty": -2,
         "frequency_penalty": 0.5, "logit_bias": {"7": -100, " 3": 2.5}},
        LIMITS,
    )  # fmt: skip
    assert (options.n, options.best_of, options.generations, options.echo) == (2, 3, 3, True)
    scores = options.token_options
    assert (scores.logprobs, scores.prompt_logprobs, scores.presence_penalty, scores.frequency_penalty) == (
        2,
        True,
        -2,
        0.5,
    )
    assert scores.logit_bias == ((3, 2.5), (7, -100.0))
    _, chat = parse_chat({**CHAT, "logprobs": True, "top_logprobs": 20, "n": 4}, LIMITS)
    assert (chat.token_options.logprobs, chat.n, chat.generations) == (20, 4, 4)
    _, plain = parse_chat({**CHAT, "logprobs": False}, LIMITS)
    assert plain.token_options.logprobs is None and not plain.logprobs


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": 1}, "logprobs"),
        ({"n": 5}, "n"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"logit_bias": {"1": -100.5}}, "logit_bias"),
    ],
)
def test_bad_chat_scores_are_named(extra, param):
    with pytest.raises(InvalidParameter) as raised:
        parse_chat({**CHAT, **extra}, LIMITS)
    assert raised.value.param == param


def test_the_choice_limit_is_the_gateways():
    assert parse_chat({**CHAT, "n": 8}, LIMITS, max_choices=8)[1].n == 8
