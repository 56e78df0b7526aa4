"""The WebSocket API's messages, as chat.petals.dev (the original chat's successor) defines them; no
I/O here (websocket.py drives it; the step rule is services/common/api/step_rule.py, which the replica runs).

One connection holds one inference session. Its first message opens it:
``{"type": "open_inference_session", "model"?, "max_length"}`` -> ``{"ok": true}``. Then any number
of ``{"type": "generate", ...}`` with v1's generation parameters and optionally ``stop_sequence``
and ``extra_stop_sequences``. Without ``stop_sequence`` one answer comes,
``{"ok": true, "outputs", "stop": true, "token_count"}``. With it, ``max_new_tokens`` are generated
at a time and each step is sent (``"stop": false``) until the answer's text ends with
``stop_sequence`` or one of ``extra_stop_sequences`` (which need ``stop_sequence`` to be exactly
one token, and then continue the session as if ``stop_sequence`` had been generated), or the
session has no room for another step, or the model ended its text; that last step has
``"stop": true``. The outputs include the stop sequence. Errors: ``{"ok": false, "traceback"}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from services.common.api.params import (
    MAX_STOP_CHARS,
    MAX_STOP_SEQUENCES,
    GenerateParams,
    Limits,
    get_model,
    loads_json,
    parse_generate,
    parse_open_session,
)
from services.common.api.step_rule import StopSequences, parse_stop_sequences
from services.common.web.errors import InvalidParameter, PayloadTooLarge

OPEN, GENERATE = "open_inference_session", "generate"
_NOT_PARAMETERS = {"type", "stop_sequence", "extra_stop_sequences"}
# JSON's longest spelling of one character: an astral one as an escaped surrogate pair, "\ud83d\ude00".
MAX_JSON_BYTES_PER_CHAR = 12
OTHER_FIELDS_BYTES = 4096  # the keys, numbers, booleans, the model name (128 characters, 6 bytes each) and spaces


@dataclass(frozen=True)
class OpenSession:
    """An ``open_inference_session`` message."""

    model: str | None  # None: the default model
    max_length: int


@dataclass(frozen=True)
class Generate:
    """A ``generate`` message: v1 parameters in the connection's session, and its stop sequences."""

    params: GenerateParams
    stops: StopSequences


def largest_message_bytes(limits: Limits) -> int:
    """Bytes of the largest valid message, a ``generate`` with every string at its longest: ``inputs``
    (MAX_INPUT_CHARS characters), ``stop_sequence`` and the extra ones (5 x 64 characters), each character
    at 12 bytes, plus the other fields. The defaults: (16,384 + 5 x 64) x 12 + 4,096 = 204,544 bytes."""
    chars = limits.max_input_chars + MAX_STOP_CHARS * (1 + MAX_STOP_SEQUENCES)
    return chars * MAX_JSON_BYTES_PER_CHAR + OTHER_FIELDS_BYTES


def parse_message(data: str | bytes, max_bytes: int) -> dict[str, Any]:
    """A message as a JSON object with a ``type``; InvalidParameter or PayloadTooLarge otherwise."""
    if isinstance(data, bytes):
        raise InvalidParameter("Messages must be JSON text; a binary message arrived")
    size = len(data.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise PayloadTooLarge(f"Message is {size} bytes; the limit is {max_bytes}")
    message = loads_json(data, "Message")
    if not isinstance(message, dict):
        raise InvalidParameter('Message must be a JSON object with a "type"')
    if message.get("type") not in (OPEN, GENERATE):
        raise InvalidParameter(f'Message type must be "{OPEN}" or "{GENERATE}", got {_show(message.get("type"))}')
    return message


def parse_open(message: dict[str, Any], limits: Limits) -> OpenSession:
    """Validate an ``open_inference_session`` message."""
    return OpenSession(model=get_model(message), max_length=parse_open_session(message, limits))


def parse_generate_message(message: dict[str, Any], session_id: str, limits: Limits) -> Generate:
    """Validate a ``generate`` message for the connection's session ``session_id``."""
    refused = (
        ("session_id", "the connection's session is used"),
        ("stop", "use stop_sequence"),
        ("json_schema", "structured output is on /api/v2/generate_stream and /v1"),
    )
    for name, instead in refused:
        if name in message:
            raise InvalidParameter(f"{name} is not a parameter here: {instead}")
    values = {name: value for name, value in message.items() if name not in _NOT_PARAMETERS}
    params = parse_generate({**values, "session_id": session_id}, limits)
    return Generate(params, parse_stop_sequences(message))


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
