"""Validation of OpenAI-style request bodies (``/v1/completions``, ``/v1/chat/completions``).

Bodies are JSON objects, checked field by field with OpenAI's types and ranges; each error
names its field (OpenAI's ``param``). ``response_format`` (``json_object``, ``json_schema``) and
``tools`` become a grammar the replica enforces (services/common/api/grammar.py,
services/gateway/openai_tools.py). Options this service cannot honour (``n`` > 1,
``logprobs``, presence and frequency penalties) are refused clearly rather than silently
ignored; ``repetition_penalty`` (vLLM's extension, the v1 parameter) is accepted; unknown fields
are ignored, as clients add new ones all the time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from services.common.api.grammar import json_schema_grammar
from services.common.api.params import (
    MAX_STOP_CHARS,
    MAX_STOP_SEQUENCES,
    REPETITION_PENALTY,
    SEED,
    TOP_P,
    Limits,
    Range,
)
from services.common.web.errors import InvalidParameter, PayloadTooLarge
from services.gateway.openai_tools import ToolChoice, parse_tool_choice

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_MESSAGES = 1024
TEMPERATURE = Range(0.0, 2.0)  # OpenAI's (below v1's floor: greedy); top_p, seed and repetition_penalty are v1's
PENALTY = Range(-2.0, 2.0)  # presence and frequency penalties (only 0 is accepted)
N = Range(1, 128)
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


@dataclass(frozen=True)
class SamplingOptions:
    """What both endpoints accept besides the prompt."""

    model: str
    max_tokens: int | None  # None: as many as the context allows
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int | None
    stream: bool
    include_usage: bool
    repetition_penalty: float | None = None  # vLLM's extension (the v1 parameter); None: off
    grammar: str | None = None  # what the output must match: response_format's or the tools' (None: free text)
    tools: ToolChoice | None = None  # the tools the model may call (chat; None: none)


def parse_completion(body: dict[str, Any], limits: Limits) -> tuple[str, SamplingOptions]:
    """``/v1/completions``: the prompt and the options."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise InvalidParameter("prompt must be a non-empty string (or a list of exactly one)", param="prompt")
    _check_length("prompt", prompt, limits)
    for name, allowed in (("echo", False), ("best_of", 1), ("suffix", None)):
        if body.get(name) not in (None, allowed):
            raise InvalidParameter(f"{name} is not supported; leave it out", param=name)
    options = _parse_options(body, limits, default_max_tokens=completions_default_max_tokens(limits))
    return prompt, replace(options, grammar=_response_format(body.get("response_format")))


def completions_default_max_tokens(limits: Limits) -> int:
    """OpenAI's default for /v1/completions, within the limit."""
    return min(COMPLETIONS_DEFAULT_MAX_TOKENS, limits.max_new_tokens)


def parse_chat(body: dict[str, Any], limits: Limits) -> tuple[list[dict[str, str]], SamplingOptions]:
    """``/v1/chat/completions``: the messages (roles normalised, content as text) and the options."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidParameter("messages must be a non-empty list of {role, content} objects", param="messages")
    if len(messages) > MAX_MESSAGES:
        raise PayloadTooLarge(f"messages has {len(messages)} entries; the limit is {MAX_MESSAGES}", param="messages")
    for name in ("functions", "function_call"):
        if body.get(name) not in (None, [], "none"):
            raise InvalidParameter(f"{name} is not supported: use tools and tool_choice", param=name)
    tools, grammar = parse_tool_choice(body), _response_format(body.get("response_format"))
    if tools is not None and grammar is not None:
        refusal = "response_format json_object or json_schema cannot be combined with tools (but with tool_choice none)"
        raise InvalidParameter(refusal, param="response_format")
    parsed = [_parse_message(message, index) for index, message in enumerate(messages)]
    options = _parse_options(body, limits, default_max_tokens=None)
    return parsed, replace(options, grammar=tools.grammar() if tools else grammar, tools=tools)


def _response_format(value: Any) -> str | None:
    """The grammar of ``response_format``: None for text, any JSON object, or a JSON Schema's documents."""
    kind = value.get("type") if isinstance(value, dict) else None
    if value is None or kind == "text":
        return None
    if kind == "json_object":
        return json_schema_grammar({"type": "object"}, "response_format")
    json_schema = value.get("json_schema") if kind == "json_schema" else None
    if not isinstance(json_schema, dict) or not isinstance(json_schema.get("name", ""), str):
        raise InvalidParameter(
            'response_format must be {"type": "text"}, {"type": "json_object"} or '
            '{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}',
            param="response_format",
        )
    if not isinstance(json_schema.get("strict", False), bool | None):
        raise InvalidParameter("response_format.json_schema.strict must be true or false", param="response_format")
    schema = json_schema.get("schema", {"type": "object"})  # OpenAI's default: any object
    return json_schema_grammar(schema, "response_format.json_schema.schema")


def check_prompt_length(prompt: str, limits: Limits) -> None:
    """A rendered chat prompt must fit the input limit (PayloadTooLarge otherwise)."""
    _check_length("messages", prompt, limits)


def _parse_message(message: Any, index: int) -> dict[str, Any]:
    """A message as ``{role, content}``; an assistant's ``tool_calls`` as ``[{id, name, arguments}]``."""
    param = f"messages[{index}]"
    if not isinstance(message, dict):
        raise InvalidParameter(f"{param} must be an object with role and content", param=param)
    name = message.get("role")
    role = _ROLES.get(name) if isinstance(name, str) else None  # a list or an object is no role (nor hashable)
    if role is None:
        raise InvalidParameter(
            f"{param}.role must be one of system, developer, user, assistant or tool, got {message.get('role')!r}",
            param=f"{param}.role",
        )
    calls = message.get("tool_calls") if role == "assistant" else None
    if calls is not None and not isinstance(calls, list):
        raise InvalidParameter(f"{param}.tool_calls must be a list", param=f"{param}.tool_calls")
    content = message.get("content")
    if calls:
        parsed = {"role": role, "content": "" if content is None else _message_text(content, f"{param}.content")}
        return {**parsed, "tool_calls": [_tool_call(call, f"{param}.tool_calls[{i}]") for i, call in enumerate(calls)]}
    return {"role": role, "content": _message_text(content, f"{param}.content")}


def _tool_call(call: Any, param: str) -> dict[str, str]:
    function = call.get("function") if isinstance(call, dict) else None
    fields = [function.get(name) for name in ("name", "arguments")] if isinstance(function, dict) else [None]
    if not all(isinstance(field, str) for field in fields) or not isinstance(call.get("id", ""), str):
        raise InvalidParameter(f"{param} must be {{id, type: function, function: {{name, arguments}}}}", param=param)
    return {"id": call.get("id", ""), "name": fields[0], "arguments": fields[1]}


def _message_text(content: Any, param: str) -> str:
    """A message's content: a string, or a list of text parts (no images here)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(part, dict) and part.get("type") == "text" for part in content):
        texts = [part.get("text") for part in content]
        if all(isinstance(text, str) for text in texts):
            return "".join(texts)  # type: ignore[arg-type]
    raise InvalidParameter(f"{param} must be a string or a list of text parts", param=param)


def _parse_options(body: dict[str, Any], limits: Limits, *, default_max_tokens: int | None) -> SamplingOptions:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidParameter("model is required: one of the names GET /v1/models lists", param="model")
    if _int(body, "n", N) not in (None, 1):
        raise InvalidParameter("n must be 1: one choice per request", param="n")
    for name in ("logprobs", "top_logprobs", "logit_bias"):
        if body.get(name) not in (None, False, {}, 0):
            raise InvalidParameter(f"{name} is not supported; leave it out", param=name)
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, PENALTY) not in (None, 0.0):
            raise InvalidParameter(f"{name} is not supported; leave it out or set 0", param=name)
    max_tokens = _int(body, "max_completion_tokens", limits.max_new_tokens_range)
    max_tokens = max_tokens if max_tokens is not None else _int(body, "max_tokens", limits.max_new_tokens_range)
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise InvalidParameter("stream_options must be an object", param="stream_options")
    temperature = _number(body, "temperature", TEMPERATURE)
    top_p = _number(body, "top_p", TOP_P)
    repetition_penalty = _number(body, "repetition_penalty", REPETITION_PENALTY)
    return SamplingOptions(
        model=model,
        max_tokens=max_tokens if max_tokens is not None else default_max_tokens,
        temperature=1.0 if temperature is None else temperature,
        top_p=1.0 if top_p is None else top_p,
        stop=_stop(body.get("stop")),
        seed=_int(body, "seed", SEED),
        stream=_bool(body, "stream"),
        include_usage=_bool(stream_options, "include_usage"),
        repetition_penalty=repetition_penalty,
    )


def _int(body: dict[str, Any], name: str, bounds: Range) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON's 1.0 is an integer too (JSON Schema says so)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidParameter(f"{name} must be an integer, got {type(value).__name__}", param=name)
    _check_range(name, value, bounds)
    return value


def _number(body: dict[str, Any], name: str, bounds: Range) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidParameter(f"{name} must be a number, got {type(value).__name__}", param=name)
    _check_range(name, value, bounds)
    return float(value)


def _check_range(name: str, value: float, bounds: Range) -> None:
    if not bounds.minimum <= value <= bounds.maximum:
        raise InvalidParameter(f"{name} must be between {bounds.minimum} and {bounds.maximum}, got {value}", param=name)
    if bounds.exclusive_minimum and value == bounds.minimum:
        raise InvalidParameter(f"{name} must be greater than {bounds.minimum:g}", param=name)


def _bool(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise InvalidParameter(f"{name} must be true or false, got {type(value).__name__}", param=name)
    return bool(value)


def _stop(value: Any) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value
    if stops is None:
        return ()
    if not isinstance(stops, list) or len(stops) > MAX_STOP_SEQUENCES:
        raise InvalidParameter(f"stop must be a string or a list of at most {MAX_STOP_SEQUENCES} strings", param="stop")
    if not all(isinstance(stop, str) and 0 < len(stop) <= MAX_STOP_CHARS for stop in stops):
        raise InvalidParameter(f"each stop sequence must be a string of 1-{MAX_STOP_CHARS} characters", param="stop")
    return tuple(stops)


def _check_length(param: str, text: str, limits: Limits) -> None:
    if len(text) > limits.max_input_chars:
        raise PayloadTooLarge(
            f"{param} is {len(text)} characters long; the limit is {limits.max_input_chars}", param=param
        )
