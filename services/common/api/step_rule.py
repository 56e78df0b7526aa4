"""The WebSocket API's step rule (chat.petals.dev's): a ``generate`` message with ``stop_sequence`` is
generated ``max_new_tokens`` at a time until its text ends with a stop sequence, the session has no
room for another step or the model ended its text. Its request to a replica and the rule itself, no I/O:
the gateway sends a ``StepsRequest`` (services/gateway/websocket.py), the replica runs the steps
(services/inference/step_loop.py)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from services.common.api.params import MAX_STOP_CHARS, MAX_STOP_SEQUENCES, GenerateParams, Limits, get_int
from services.common.api.replica_request import ReplicaRequest
from services.common.web.errors import InvalidParameter


@dataclass(frozen=True)
class StopSequences:
    """A message's ``stop_sequence`` and ``extra_stop_sequences`` (which need ``stop_sequence``)."""

    sequence: str | None = None
    extras: tuple[str, ...] = ()

    @property
    def stop_token(self) -> str | None:
        """With extra stop sequences, ``stop_sequence`` must be exactly one token (it may replace one)."""
        return self.sequence if self.extras else None


def parse_stop_sequences(values: dict[str, Any]) -> StopSequences:
    """Validate ``stop_sequence`` and ``extra_stop_sequences``; InvalidParameter otherwise."""
    sequence = values.get("stop_sequence")
    if sequence is not None and not (isinstance(sequence, str) and 0 < len(sequence) <= MAX_STOP_CHARS):
        raise InvalidParameter(f"stop_sequence must be a string of 1-{MAX_STOP_CHARS} characters")
    extras = values.get("extra_stop_sequences")
    if extras is not None:
        valid = isinstance(extras, list) and all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in extras)
        if not valid or len(extras) > MAX_STOP_SEQUENCES:
            raise InvalidParameter(
                f"extra_stop_sequences must be a list of at most {MAX_STOP_SEQUENCES} strings "
                f"of 1-{MAX_STOP_CHARS} characters"
            )
        if sequence is None:
            raise InvalidParameter("extra_stop_sequences require stop_sequence (exactly one token)")
    return StopSequences(sequence, tuple(extras or ()))


@dataclass(frozen=True)
class StepsRequest:
    """One ``generate`` message as the gateway asks its session's replica to run it (``steps``, to the
    replica's ``/api/v2/generate_stream``): the first step's request (the message's parameters, the
    client, and ``replace_last_token`` when the last answer ended with an extra stop sequence), the stop
    sequences, and the session's ``max_length``."""

    first: ReplicaRequest
    stops: StopSequences
    session_max_length: int

    def to_json(self) -> dict[str, Any]:
        """The JSON body sent to a replica."""
        stops = {"stop_sequence": self.stops.sequence, "extra_stop_sequences": list(self.stops.extras)}
        body = {**self.first.to_json(), "steps": True, "session_max_length": self.session_max_length}
        return {**body, **{name: value for name, value in stops.items() if value}}

    @classmethod
    def from_json(cls, values: dict[str, Any], limits: Limits) -> StepsRequest:
        """Validate a replica's request body; InvalidParameter otherwise."""
        first = ReplicaRequest.from_json(values, limits)
        if first.params.session_id is None:
            raise InvalidParameter("session_id is required")
        session_max_length = get_int(values, "session_max_length", limits.max_length_range)
        if session_max_length is None:
            raise InvalidParameter("session_max_length is required")
        return cls(first, parse_stop_sequences(values), session_max_length)

    def step(self, number: int, params: GenerateParams) -> ReplicaRequest:
        """Step ``number``'s request (counting from 0: only the first may replace the session's last token)."""
        replace_last_token = self.first.replace_last_token if number == 0 else None
        return replace(
            self.first, params=params, stop_token=self.stops.stop_token, replace_last_token=replace_last_token
        )


@dataclass
class StepAnswer:
    """One ``generate`` message's answer, step by step: what each step's request is and what to send."""

    params: GenerateParams
    stops: StopSequences
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
        return self.params if self.steps == 0 else replace(self.params, inputs=None)

    def after_step(self, done: dict[str, Any]) -> dict[str, Any] | None:
        """Take a step's result (a generation's summary); the message to send, if any (text stays
        unsent while it is empty, and its tokens count toward the next message)."""
        self.steps += 1
        outputs, generated = str(done["outputs"]), int(done["generated_tokens"])
        self.text += outputs
        self.unsent_text += outputs
        self.unsent_tokens += generated
        self._held = int(done.get("cached_tokens", 0)) + int(done.get("prompt_tokens", 0)) + generated
        self.ended_by_extra = any(self.text.endswith(extra) for extra in self.stops.extras)
        self.done = (
            self.stops.sequence is None
            or self.text.endswith(self.stops.sequence)
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
        if self.params.max_new_tokens is None:  # max_length: the whole answer's length, reached in one step
            return False
        return self._held is not None and self._held + self.params.max_new_tokens <= self.session_max_length
