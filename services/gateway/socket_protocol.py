"""The WebSocket API's messages and its step rule, as chat.petals.dev (the original chat's successor)
defines them; no I/O here (websocket.py drives it).

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

from dataclasses import dataclass, field, replace
from typing import Any

from services.common.errors import InvalidParameter, PayloadTooLarge
from services.common.params import (
    MAX_STOP_CHARS,
    MAX_STOP_SEQUENCES,
    GenerateParams,
    Limits,
    get_model,
    loads_json,
    parse_generate,
    parse_open_session,
)

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
    stop_sequence: str | None
    extra_stop_sequences: tuple[str, ...]


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
    for name, instead in (("session_id", "the connection's session is used"), ("stop", "use stop_sequence")):
        if name in message:
            raise InvalidParameter(f"{name} is not a parameter here: {instead}")
    values = {name: value for name, value in message.items() if name not in _NOT_PARAMETERS}
    params = parse_generate({**values, "session_id": session_id}, limits)
    stop_sequence = message.get("stop_sequence")
    if stop_sequence is not None and not (isinstance(stop_sequence, str) and 0 < len(stop_sequence) <= MAX_STOP_CHARS):
        raise InvalidParameter(f"stop_sequence must be a string of 1-{MAX_STOP_CHARS} characters")
    extras = message.get("extra_stop_sequences")
    if extras is not None:
        valid = isinstance(extras, list) and all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in extras)
        if not valid or len(extras) > MAX_STOP_SEQUENCES:
            raise InvalidParameter(
                f"extra_stop_sequences must be a list of at most {MAX_STOP_SEQUENCES} strings "
                f"of 1-{MAX_STOP_CHARS} characters"
            )
        if stop_sequence is None:
            raise InvalidParameter("extra_stop_sequences require stop_sequence (exactly one token)")
    return Generate(params, stop_sequence, tuple(extras or ()))


@dataclass
class StepAnswer:
    """One ``generate`` message's answer, step by step: what each step's request is and what to send."""

    request: Generate
    session_max_length: int
    text: str = ""  # the answer so far
    unsent_text: str = ""
    unsent_tokens: int = 0
    steps: int = 0
    ended_by_extra: bool = False  # an extra stop sequence ended it: the session goes on as if stop_sequence
    done: bool = False
    _held: int | None = field(default=None, repr=False)  # tokens the session holds after the last step

    def next_params(self) -> GenerateParams:
        """The next step's request: the message's inputs with the first step only."""
        params = self.request.params
        return params if self.steps == 0 else replace(params, inputs=None)

    def after_step(self, done: dict[str, Any]) -> dict[str, Any] | None:
        """Take a step's result (a replica stream's ``done`` event); the message to send, if any
        (text stays unsent while it is empty, and its tokens count toward the next message)."""
        self.steps += 1
        outputs, generated = str(done["outputs"]), int(done["generated_tokens"])
        self.text += outputs
        self.unsent_text += outputs
        self.unsent_tokens += generated
        self._held = int(done.get("cached_tokens", 0)) + int(done.get("prompt_tokens", 0)) + generated
        stop_sequence, extras = self.request.stop_sequence, self.request.extra_stop_sequences
        self.ended_by_extra = any(self.text.endswith(extra) for extra in extras)
        self.done = (
            stop_sequence is None
            or self.text.endswith(stop_sequence)
            or self.ended_by_extra
            or done.get("finish_reason") == "eos"
            or generated == 0
            or not self._room_for_a_step()
        )
        if not self.done and not self.unsent_text:
            return None
        message = {"ok": True, "outputs": self.unsent_text, "stop": self.done, "token_count": self.unsent_tokens}
        self.unsent_text, self.unsent_tokens = "", 0
        return message

    def _room_for_a_step(self) -> bool:
        params = self.request.params
        if params.max_new_tokens is None:  # max_length: the whole answer's length, reached in one step
            return False
        return self._held is not None and self._held + params.max_new_tokens <= self.session_max_length


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
