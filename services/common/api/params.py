"""Reading and validating the public API's parameters (shared by gateway and inference).

Parameters arrive as a query string, a form body or a JSON body (the original app read
Flask's ``request.values``); they are merged into one mapping and each one is checked for
type and range here, so every service rejects bad input the same way, with a clear message.
"""

from __future__ import annotations

import json
import math
import re
import urllib.parse
from dataclasses import dataclass
from typing import Any

import falcon
import falcon.asgi

from services.common.api.grammar import get_grammar
from services.common.startup.config import Env
from services.common.web.errors import InvalidParameter, PayloadTooLarge

SESSION_ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
MODEL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9._:/-]{1,128}$")
_FORM = "application/x-www-form-urlencoded"
_JSON = "application/json"
_DRAIN_FACTOR = 8  # oversized bodies up to 8x the limit are read and dropped before the 413
MAX_JSON_DEPTH = 32  # nesting of arrays and objects in a client's JSON (no parameter needs more than 3)


@dataclass(frozen=True)
class Range:
    """A number's accepted range: the validation and the OpenAPI document both read it, so each
    bound is written once."""

    minimum: float
    maximum: float
    exclusive_minimum: bool = False

    def schema(self) -> dict[str, float]:
        """Its JSON Schema keywords."""
        return {("exclusiveMinimum" if self.exclusive_minimum else "minimum"): self.minimum, "maximum": self.maximum}


@dataclass(frozen=True)
class Limits:
    """Operator-set bounds on what one request may ask for."""

    max_body_bytes: int = 1_048_576
    max_input_chars: int = 16_384
    max_length: int = 2048
    max_new_tokens: int = 1024

    @classmethod
    def from_env(cls, env: Env) -> Limits:
        """MAX_BODY_BYTES, MAX_INPUT_CHARS, MAX_LENGTH_LIMIT, MAX_NEW_TOKENS_LIMIT."""
        return cls(
            max_body_bytes=env.int("MAX_BODY_BYTES", cls.max_body_bytes, minimum=1024),
            max_input_chars=env.int("MAX_INPUT_CHARS", cls.max_input_chars, minimum=1),
            max_length=env.int("MAX_LENGTH_LIMIT", cls.max_length, minimum=2, maximum=65_536),
            max_new_tokens=env.int("MAX_NEW_TOKENS_LIMIT", cls.max_new_tokens, minimum=1, maximum=65_536),
        )

    @property
    def max_length_range(self) -> Range:
        return Range(1, self.max_length)

    @property
    def max_new_tokens_range(self) -> Range:
        return Range(1, self.max_new_tokens)


@dataclass(frozen=True)
class GenerateParams:
    """A validated generation request (the v1 ``generate`` contract)."""

    inputs: str | None
    do_sample: bool
    temperature: float | None
    top_k: int | None
    top_p: float | None
    max_length: int | None
    max_new_tokens: int | None
    session_id: str | None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    model: str | None = None  # None: the default model (the gateway), or the one the replica serves
    repetition_penalty: float | None = None  # transformers' RepetitionPenaltyLogitsProcessor; None or 1: off
    grammar: str | None = None  # llguidance's grammar the output must match (services/common/api/grammar.py)


MAX_STOP_SEQUENCES = 4
MAX_SEED = 2**63 - 1
MAX_STOP_CHARS = 64
MAX_REPETITION_PENALTY = 10.0
# Floors on temperature and repetition_penalty: logits divided by a tiny one overflow to inf (the
# swarm's sampling then fails: found by fuzzing with 5e-324).
TEMPERATURE = Range(0.01, 100.0)
TOP_K = Range(1, 1_000_000)
TOP_P = Range(0.0, 1.0, exclusive_minimum=True)
SEED = Range(0, MAX_SEED)
REPETITION_PENALTY = Range(0.01, MAX_REPETITION_PENALTY)


def read_values(req: falcon.Request, limits: Limits) -> dict[str, Any]:
    """Merge query-string and body parameters; a name given twice is an error (WSGI apps)."""
    if _declared_too_large(req, limits):
        if req.content_length <= _DRAIN_FACTOR * limits.max_body_bytes:
            req.bounded_stream.exhaust()  # read it, so the keep-alive connection stays usable
        raise _too_large(req, limits)
    return _merge(req, _read_raw_body(req, limits.max_body_bytes + 1), limits)


async def read_values_async(req: falcon.asgi.Request, limits: Limits) -> dict[str, Any]:
    """``read_values`` for ASGI apps (the gateway): the body is read without blocking."""
    if _declared_too_large(req, limits):
        if req.content_length <= _DRAIN_FACTOR * limits.max_body_bytes:
            await req.stream.exhaust()
        raise _too_large(req, limits)
    return _merge(req, await req.stream.read(limits.max_body_bytes + 1), limits)


def _declared_too_large(req: falcon.Request | falcon.asgi.Request, limits: Limits) -> bool:
    return req.content_length is not None and req.content_length > limits.max_body_bytes


def _too_large(req: falcon.Request | falcon.asgi.Request, limits: Limits) -> PayloadTooLarge:
    return PayloadTooLarge(f"Request body is {req.content_length} bytes; the limit is {limits.max_body_bytes}")


def _merge(req: falcon.Request | falcon.asgi.Request, body: bytes, limits: Limits) -> dict[str, Any]:
    values: dict[str, Any] = {}
    _require_utf8(req.query_string, "Query string")
    for name, value in req.params.items():
        if isinstance(value, list):
            raise InvalidParameter(f"{name} is given more than once")
        values[name] = value
    for name, value in _parse_body(req.content_type, body, limits).items():
        if name in values:
            raise InvalidParameter(f"{name} is given both in the query string and in the body")
        values[name] = value
    return values


def _parse_body(content_type: str | None, body: bytes, limits: Limits) -> dict[str, Any]:
    media_type = (content_type or "").split(";")[0].strip().lower()
    if media_type not in (_FORM, _JSON):
        if body.strip():
            raise InvalidParameter(f"Unsupported Content-Type {media_type or 'none'}: send JSON or a form")
        return {}
    if len(body) > limits.max_body_bytes:
        raise PayloadTooLarge(f"Request body is larger than the limit of {limits.max_body_bytes} bytes")
    if not body.strip():
        return {}
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidParameter("Request body is not valid UTF-8") from None
    return _parse_json(text) if media_type == _JSON else _parse_form(text)


def _read_raw_body(req: falcon.Request, size: int) -> bytes:
    """Up to ``size`` bytes of the body, whether sent with a Content-Length or chunked."""
    if req.content_length is None and req.env.get("wsgi.input_terminated"):
        # Chunked: Falcon's bounded stream would read nothing; the server ends this stream at the body's end.
        return req.stream.read(size)
    return req.bounded_stream.read(size)


def _require_utf8(encoded: str, what: str) -> None:
    """Percent-encoded text must decode as UTF-8 (Falcon would silently put U+FFFD instead)."""
    if "%" in encoded:
        try:
            urllib.parse.unquote_to_bytes(encoded).decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidParameter(f"{what} is not valid UTF-8 once percent-decoded") from None


def loads_json(text: str | bytes, what: str) -> Any:
    """A client's JSON ``text``; InvalidParameter if it is not JSON or nests deeper than MAX_JSON_DEPTH
    (Python's parser recurses: thousands of ``[`` would raise RecursionError)."""
    too_deep = InvalidParameter(f"{what} nests arrays or objects deeper than {MAX_JSON_DEPTH} levels")
    try:
        data = json.loads(text)
    except RecursionError:
        raise too_deep from None
    except ValueError as error:
        raise InvalidParameter(f"{what} is not valid JSON: {error}") from None
    if _too_deep(data):
        raise too_deep
    return data


def _too_deep(data: Any) -> bool:
    """Whether ``data`` nests containers deeper than MAX_JSON_DEPTH (walked without recursion)."""
    level = [data]
    for _ in range(MAX_JSON_DEPTH):
        level = [item for value in level if isinstance(value, (dict, list)) for item in _items(value)]
        if not level:
            return False
    return any(isinstance(value, (dict, list)) for value in level)


def _items(container: dict | list) -> Any:
    return container.values() if isinstance(container, dict) else container


def _parse_json(text: str) -> dict[str, Any]:
    data = loads_json(text, "Request body")
    if not isinstance(data, dict):
        raise InvalidParameter("JSON body must be an object of parameters")
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:  # an escape such as \ud800 that is not half of a pair
        raise InvalidParameter("Request body has a lone surrogate escape (\\uD800-\\uDFFF): not valid text") from None
    return data


def _parse_form(text: str) -> dict[str, Any]:
    _require_utf8(text, "Form body")
    values: dict[str, Any] = {}
    for name, value in falcon.uri.parse_query_string(text, keep_blank=False).items():
        if isinstance(value, list):
            raise InvalidParameter(f"{name} is given more than once")
        values[name] = value
    return values


def get_bool(values: dict[str, Any], name: str, default: bool) -> bool:
    """0/1 (the seed API's form), true/false, or a JSON boolean."""
    value = values.get(name)
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("0", "1", "true", "false"):
        return value.strip().lower() in ("1", "true")
    raise InvalidParameter(f"{name} must be 0 or 1, got {_show(value)}")


def get_int(values: dict[str, Any], name: str, bounds: Range) -> int | None:
    """An integer in ``bounds`` (inclusive), or None when absent."""
    value = values.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON's 1.0 is an integer too (JSON Schema says so)
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise InvalidParameter(f"{name} must be an integer, got {_show(value)}")
    try:
        number = int(value.strip()) if isinstance(value, str) else value
    except ValueError:
        raise InvalidParameter(f"{name} must be an integer, got {_show(value)}") from None
    if not bounds.minimum <= number <= bounds.maximum:
        raise InvalidParameter(f"{name} must be between {bounds.minimum} and {bounds.maximum}, got {number}")
    return number


def get_float(values: dict[str, Any], name: str, bounds: Range) -> float | None:
    """A finite float in ``bounds``, or None when absent."""
    value = values.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise InvalidParameter(f"{name} must be a number, got {_show(value)}")
    try:
        number = float(value)
    except ValueError:
        raise InvalidParameter(f"{name} must be a number, got {_show(value)}") from None
    above = number > bounds.minimum if bounds.exclusive_minimum else number >= bounds.minimum
    if not math.isfinite(number) or not above or number > bounds.maximum:
        low = f"{'greater than' if bounds.exclusive_minimum else 'at least'} {bounds.minimum}"
        raise InvalidParameter(f"{name} must be {low} and at most {bounds.maximum}, got {_show(value)}")
    return number


def get_str(values: dict[str, Any], name: str, *, max_chars: int) -> str | None:
    """A string of at most ``max_chars`` characters, or None when absent."""
    value = values.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidParameter(f"{name} must be a string, got {_show(value)}")
    if len(value) > max_chars:
        raise PayloadTooLarge(f"{name} is {len(value)} characters long; the limit is {max_chars}")
    return value


def get_session_id(values: dict[str, Any], *, required: bool) -> str | None:
    """A session id as issued by open_inference_session."""
    value = values.get("session_id")
    if value is None or value == "":
        if required:
            raise InvalidParameter("session_id is required")
        return None
    if not isinstance(value, str) or not SESSION_ID_PATTERN.match(value):
        raise InvalidParameter("session_id must be 1-128 characters of letters, digits, '.', '_' or '-'")
    return value


def get_stop(values: dict[str, Any]) -> tuple[str, ...]:
    """Stop sequences: one string, or a JSON list of up to 4 strings of 1-64 characters."""
    value = values.get("stop")
    if value is None or value == "" or value == []:
        return ()
    stops = [value] if isinstance(value, str) else value
    valid = isinstance(stops, list) and all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)
    if not valid or len(stops) > MAX_STOP_SEQUENCES:
        raise InvalidParameter(
            f"stop must be a string or a list of at most {MAX_STOP_SEQUENCES} strings "
            f"of 1-{MAX_STOP_CHARS} characters, got {_show(value)}"
        )
    return tuple(stops)


def get_model(values: dict[str, Any]) -> str | None:
    """The optional ``model`` name (which one serves it is the gateway's to check)."""
    value = values.get("model")
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not MODEL_NAME_PATTERN.match(value):
        raise InvalidParameter(
            f"model must be a model name (GET /v1/models lists them), got {_show(value)}", param="model"
        )
    return value


def parse_generate(
    values: dict[str, Any], limits: Limits, *, fill_context: bool = False, internal: bool = False
) -> GenerateParams:
    """Validate the parameters of ``POST /api/v1/generate``; with ``fill_context`` (the gateway's
    own requests) neither length may be set: as many tokens as the context allows. Only an
    ``internal`` request (the gateway's, services/common/api/replica_request.py) may carry a ``grammar``."""
    if not internal and values.get("grammar") not in (None, ""):
        raise InvalidParameter("grammar is not a parameter: use json_schema", param="grammar")
    params = GenerateParams(
        inputs=get_str(values, "inputs", max_chars=limits.max_input_chars),
        do_sample=get_bool(values, "do_sample", default=False),
        temperature=get_float(values, "temperature", TEMPERATURE),
        top_k=get_int(values, "top_k", TOP_K),
        top_p=get_float(values, "top_p", TOP_P),
        max_length=get_int(values, "max_length", limits.max_length_range),
        max_new_tokens=get_int(values, "max_new_tokens", limits.max_new_tokens_range),
        session_id=get_session_id(values, required=False),
        stop=get_stop(values),
        seed=get_int(values, "seed", SEED),
        model=get_model(values),
        repetition_penalty=get_float(values, "repetition_penalty", REPETITION_PENALTY),
        grammar=get_grammar(values),
    )
    lengths = (params.max_length is not None) + (params.max_new_tokens is not None)
    if fill_context and lengths:
        raise InvalidParameter("fill_context excludes max_length and max_new_tokens")
    if not fill_context and lengths != 1:
        raise InvalidParameter("Set exactly one of max_length or max_new_tokens")
    if params.session_id is None and not params.inputs:
        raise InvalidParameter("inputs is required when no session_id is given")
    return params


def parse_open_session(values: dict[str, Any], limits: Limits) -> int:
    """Validate ``open_inference_session``: returns the session's max_length."""
    max_length = get_int(values, "max_length", limits.max_length_range)
    if max_length is None:
        raise InvalidParameter("max_length is required: the most tokens the session will hold")
    return max_length


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
