"""One generation, run in the request's own thread: one JSON answer (v1) or a stream of events.

A ``Generation`` is prepared by ``planner.GenerationPlanner`` (validation, session lease: errors are
raised before any output). Its parts: ``SwarmDriver`` produces the tokens (and rebuilds the
Petals session after a swarm failure), ``TokenText`` turns them into text and decides when a stop
sequence ends it, ``TokenTimer`` times them, and the lease is the only way to the session. The
SSE endpoint writes the events as they come, so the client paces the model; closing the stream
(a client that went away) stops the model at once and releases the session. No thread, no queue
between the model and the socket: under load they cost the replica CPU on every token.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from typing import Any

from services.common.api.params import GenerateParams
from services.common.api.token_options import NO_TOKEN_OPTIONS, TokenOptions
from services.common.web.errors import ApiError, SessionNotFound
from services.inference.decoding import IncrementalDecoder
from services.inference.driver import SwarmDriver, SwarmFailure
from services.inference.metrics import (
    CACHED_PROMPT_TOKENS,
    GENERATED_TOKENS,
    PROMPT_TOKENS,
    REQUESTS_RUNNING,
    RUNNING_REQUESTS_ALIAS,
    TokenTimer,
    counted,
)
from services.inference.sessions import OneOffLease, SessionLease
from services.inference.swarm_stepper import SwarmStepper
from services.inference.token_text import TokenText


@dataclass(frozen=True)
class TokenEvent:
    """One generated token and the text it released (may be empty)."""

    text: str
    generated_tokens: int
    logprobs: dict[str, Any] | None = None  # OpenAI's entry, when asked for (none for an end token)


@dataclass(frozen=True)
class PromptScores:
    """The prompt's tokens' entries (the first unscored), before the first token's event."""

    entries: list[dict[str, Any]]


@dataclass(frozen=True)
class GenerationResult:
    """What one generate request produced."""

    text: str
    prompt_tokens: int  # sent through the swarm by this request
    cached_tokens: int  # already held by the session this request continued
    generated_tokens: int
    finish_reason: str  # "length", "stop" (a stop sequence) or "eos"
    stop_sequence: str | None
    seconds: float
    cumulative_logprob: float | None = None  # of every generated token, when scores were asked for

    def summary(self) -> dict[str, Any]:
        """The final event of a stream."""
        scores = {} if self.cumulative_logprob is None else {"cumulative_logprob": self.cumulative_logprob}
        return {
            **scores,
            "outputs": self.text,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "generated_tokens": self.generated_tokens,
            "finish_reason": self.finish_reason,
            "stop_sequence": self.stop_sequence,
            "seconds_per_token": self.seconds / self.generated_tokens if self.generated_tokens else None,
        }


class Generation:
    """One prepared generation; ``run`` it for the whole result or ``stream`` its events."""

    def __init__(
        self,
        stepper: SwarmStepper,
        lease: SessionLease | OneOffLease,
        params: GenerateParams,
        input_ids: list[int],
        new_tokens: int,
        decoder: IncrementalDecoder,
        options: TokenOptions = NO_TOKEN_OPTIONS,
    ) -> None:
        self._stepper = stepper
        self._lease = lease
        self._input_ids = input_ids
        self._new_tokens = new_tokens
        self._cached_tokens = lease.token_count
        self._text = TokenText(decoder, params.stop)
        self._options = options
        self._reader = None if options.logprobs is None else stepper.score_reader(options.logprobs)
        self._cumulative_logprob = 0.0
        self._prompt_scores: list[dict[str, Any]] | None = None
        start = self._cached_tokens + len(input_ids)  # the penalties count the tokens after these
        processors = stepper.logits_processors(params, options, start, self._reader)
        prompt_hidden = self._score_prompt if options.prompt_logprobs else None
        self._driver = SwarmDriver(stepper, lease, processors, prompt_hidden)
        self._timer = TokenTimer()
        self._events: Iterator[TokenEvent | PromptScores | GenerationResult] | None = None
        self._released = False

    def run(self) -> GenerationResult:
        """Generate to the end; return the whole result."""
        for event in self.stream():
            if isinstance(event, GenerationResult):
                return event
        raise AssertionError("a stream always ends with its result")

    def stream(self) -> Iterator[TokenEvent | PromptScores | GenerationResult]:
        """Each token's event, then the result, once the session is released (the client may use it
        again at once). Closing it early stops the model and releases the session."""
        self._events = self._stream()
        return self._events

    def close(self) -> None:
        """Stop the generation and release the session, also when its stream never started (a
        response closed before its first chunk: a generator that never ran ignores ``close``)."""
        if self._events is not None:
            self._events.close()
        if not self._released:
            self._cleanup()

    def _stream(self) -> Iterator[TokenEvent | PromptScores | GenerationResult]:
        try:
            with counted(REQUESTS_RUNNING, RUNNING_REQUESTS_ALIAS):
                yield from self._token_events()
            result = self._finish()
        finally:
            self._cleanup()
        yield result

    def _token_events(self) -> Iterator[TokenEvent | PromptScores]:
        PROMPT_TOKENS.inc(len(self._input_ids))
        CACHED_PROMPT_TOKENS.inc(self._cached_tokens)
        try:
            with closing(self._driver.tokens(self._input_ids, self._new_tokens)) as tokens:
                for token_id in tokens:
                    self._timer.step()
                    if self._prompt_scores is not None:
                        yield PromptScores(self._prompt_scores)
                        self._prompt_scores = None
                    logprobs = self._token_logprobs(token_id)
                    yield TokenEvent(self._text.push(token_id), self._text.count, logprobs)
                    if self._text.stopped:
                        return
        except SwarmFailure as failure:
            raise self._failed(failure) from failure.__cause__
        finally:
            GENERATED_TOKENS.inc(self._text.count)

    def _score_prompt(self, hidden: Any) -> None:
        top = self._options.logprobs or 0
        self._prompt_scores = self._stepper.prompt_scores(hidden, self._input_ids, top)

    def _token_logprobs(self, token_id: int) -> dict[str, Any] | None:
        """The token's entry (none for an end-of-sequence token: it is no part of the text)."""
        if self._reader is None:
            return None
        self._cumulative_logprob += self._reader.logprob(token_id)
        return None if token_id in self._stepper.end_of_sequence_ids else self._reader.entry(token_id)

    def _failed(self, failure: SwarmFailure) -> ApiError:
        """The error to answer once the swarm broke the session beyond repair."""
        # Its state is now unknown: retire it, in the words the original client matches, so that
        # it reopens a session and replays the dialogue.
        self._lease.retire("failed")
        if not self._lease.resumable:
            return failure  # its client never saw a session id
        return SessionNotFound(self._lease.session_id, detail=f"{failure.message}.")

    def _finish(self) -> GenerationResult:
        self._text.finish(flush=not self._lease.resumable)
        return GenerationResult(
            text=self._text.text,
            prompt_tokens=len(self._input_ids),
            cached_tokens=self._cached_tokens,
            generated_tokens=self._text.count,
            finish_reason=self._text.finish_reason(new_tokens=self._new_tokens),
            stop_sequence=self._text.stop_sequence,
            seconds=self._timer.elapsed,
            cumulative_logprob=None if self._reader is None else self._cumulative_logprob,
        )

    def _cleanup(self) -> None:
        self._released = True
        try:
            if self._lease.conversation and self._lease.petals is not None:
                self._lease.record_text(self._stepper.decode_all(self._lease.tokens.ids()))
        finally:
            self._lease.release()
