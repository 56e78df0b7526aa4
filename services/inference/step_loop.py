"""A WebSocket ``generate`` message run on the replica: generations in its session, one step after
another, until the step rule (services/common/api/step_rule.py) ends the answer."""

from __future__ import annotations

from collections.abc import Generator as EventsThenResult
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from services.common.api.replica_request import ReplicaRequest
from services.common.api.step_rule import StepAnswer, StepsRequest
from services.inference.generation import Generation, GenerationResult
from services.inference.planner import GenerationPlanner


@dataclass(frozen=True)
class StepMessage:
    """What a step produced: the message to send the client, or None while text is held back or a
    token was generated (an event all the same: writing it is how a gone client is noticed)."""

    message: dict[str, Any] | None


@dataclass(frozen=True)
class StepsEnded:
    """The answer is complete: its last message (``"stop": true``), and whether an extra stop sequence
    ended it (the session goes on as if ``stop_sequence`` came)."""

    message: dict[str, Any]
    ended_by_extra: bool


class SteppedGeneration:
    """The steps of one ``generate`` message; like a ``Generation``, ``stream`` it and ``close`` it."""

    def __init__(self, planner: GenerationPlanner, request: StepsRequest) -> None:
        """Prepares the first step: its errors are raised before any output."""
        self._planner = planner
        self._request = request
        self._answer = StepAnswer(request.first.params, request.stops, request.session_max_length)
        self._generation = planner.prepare(self._next_step())
        self._events: Iterator[StepMessage | StepsEnded] | None = None

    def stream(self) -> Iterator[StepMessage | StepsEnded]:
        """An event per generated token or message to send, then ``StepsEnded`` with the last message.
        Closing it early stops the step running and releases the session."""
        self._events = self._steps()
        return self._events

    def close(self) -> None:
        """Stop the step running, also when the stream never started."""
        if self._events is not None:
            self._events.close()
        self._generation.close()

    def _steps(self) -> Iterator[StepMessage | StepsEnded]:
        while True:
            result = yield from self._tokens(self._generation)
            message = self._answer.after_step(result.summary())
            if self._answer.done:
                assert message is not None  # the last step always sends one
                yield StepsEnded(message, self._answer.ended_by_extra)
                return
            if message is not None:
                yield StepMessage(message)
            self._generation = self._planner.prepare(self._next_step())

    @staticmethod
    def _tokens(generation: Generation) -> EventsThenResult[StepMessage, None, GenerationResult]:
        """A ``StepMessage(None)`` per token; returns the result."""
        for event in generation.stream():
            if isinstance(event, GenerationResult):
                return event
            yield StepMessage(None)
        raise AssertionError("a stream always ends with its result")

    def _next_step(self) -> ReplicaRequest:
        return self._request.step(self._answer.steps, self._answer.next_params())
