"""Validation of OpenAI-style request bodies (``/v1/completions``, ``/v1/chat/completions``).

Bodies are JSON objects, checked field by field with OpenAI's types and ranges; each error
names its field (OpenAI's ``param``). ``response_format`` (``json_object``, ``json_schema``) and
``tools`` become a grammar the replica enforces (services/common/api/grammar.py,
services/gateway/openai_tools.py). Scores (``logprobs``, ``top_logprobs``, ``echo``), several
choices (``n`` up to the gateway's ``OPENAI_MAX_CHOICES``, ``best_of``), penalties and
``logit_bias`` are read here into ``SamplingOptions``; the replica applies them
(services/common/api/token_options.py). Options this service cannot honour (``suffix``, the legacy
``functions``) are refused clearly rather than silently ignored; ``repetition_penalty`` (vLLM's
extension, the v1 parameter) is accepted; unknown fields are ignored, as clients add new ones all
the time.
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
from services.common.api.token_options import (
    COMPLETION_LOGPROBS,
    NO_TOKEN_OPTIONS,
    PENALTY,
    TOP_LOGPROBS,
    TokenOptions,
    parse_logit_bias,
)
from services.common.web.errors import InvalidParameter, PayloadTooLarge
from services.gateway.openai_tools import ToolChoice, parse_tool_choice

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_MESSAGES = 1024
TEMPERATURE = Range(0.0, 2.0)  # OpenAI's (below v1's floor: greedy); top_p, seed and repetition_penalty are v1's
DEFAULT_MAX_CHOICES = 4  # n and best_of (OPENAI_MAX_CHOICES)
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
    n: int = 1  # choices returned
    best_of: int = 1  # choices generated (completions), the n most likely returned
    echo: bool = False  # completions: the prompt before each choice's text
    token_options: TokenOptions = NO_TOKEN_OPTIONS  # logprobs, penalties, logit_bias
    grammar: str | None = None  # what the output must match: response_format's or the tools' (None: free text)
    tools: ToolChoice | None = None  # the tools the model may call (chat; None: none)

    @property
    def generations(self) -> int:
        """How many generations the request runs."""
        return max(self.n, self.best_of)

    @property
    def logprobs(self) -> bool:
        """Whether the answer carries scores."""
        return self.token_options.logprobs is not None


def parse_completion(
    body: dict[str, Any], limits: Limits, max_choices: int = DEFAULT_MAX_CHOICES
) -> tuple[str, SamplingOptions]:
    """``/v1/completions``: the prompt and the options."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise InvalidParameter("prompt must be a non-empty string (or a list of exactly one)", param="prompt")
    _check_length("prompt", prompt, limits)
    if body.get("suffix") is not None:
        raise InvalidParameter("suffix is not supported; leave it out", param="suffix")
    options = _parse_options(body, limits, max_choices, default_max_tokens=completions_default_max_tokens(limits))
    logprobs, echo = _int(body, "logprobs", COMPLETION_LOGPROBS), _bool(body, "echo")
    best_of = _int(body, "best_of", Range(1, max_choices))
    if best_of is not None and best_of < options.n:
        raise InvalidParameter(f"best_of must be at least n ({options.n}), got {best_of}", param="best_of")
    best_of = options.n if best_of is None else best_of
    if options.stream and best_of > options.n:
        raise InvalidParameter("best_of greater than n cannot be streamed", param="best_of")
    scores = replace(options.token_options, logprobs=logprobs, prompt_logprobs=echo and logprobs is not None)
    grammar = _response_format(body.get("response_format"))
    return prompt, replace(options, best_of=best_of, echo=echo, token_options=scores, grammar=grammar)


def completions_default_max_tokens(limits: Limits) -> int:
    """OpenAI's default for /v1/completions, within the limit."""
    return min(COMPLETIONS_DEFAULT_MAX_TOKENS, limits.max_new_tokens)


def parse_chat(
    body: dict[str, Any], limits: Limits, max_choices: int = DEFAULT_MAX_CHOICES
) -> tuple[list[dict[str, str]], SamplingOptions]:
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
    options = _parse_options(body, limits, max_choices, default_max_tokens=None)
    top = _int(body, "top_logprobs", TOP_LOGPROBS)
    if top is not None and not _bool(body, "logprobs"):
        raise InvalidParameter("top_logprobs needs logprobs: true", param="top_logprobs")
    logprobs = (top or 0) if _bool(body, "logprobs") else None
    if tools is not None and options.n > 1:
        raise InvalidParameter("tools can be combined with n = 1 only", param="n")
    scores = replace(options.token_options, logprobs=logprobs)
    grammar = tools.grammar() if tools else grammar
    return parsed, replace(options, token_options=scores, grammar=grammar, tools=tools)


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


def _parse_options(
    body: dict[str, Any], limits: Limits, max_choices: int, *, default_max_tokens: int | None
) -> SamplingOptions:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidParameter("model is required: one of the names GET /v1/models lists", param="model")
    n = _int(body, "n", Range(1, max_choices))
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
        n=1 if n is None else n,
        token_options=_shaping(body),
    )


def _shaping(body: dict[str, Any]) -> TokenOptions:
    """Presence and frequency penalties, and logit_bias."""
    return TokenOptions(
        presence_penalty=_number(body, "presence_penalty", PENALTY) or 0.0,
        frequency_penalty=_number(body, "frequency_penalty", PENALTY) or 0.0,
        logit_bias=parse_logit_bias(body.get("logit_bias")),
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
