"""One generation, run in the request's thread (v1: one JSON answer) or in a producer thread.

A ``Generation`` is prepared by ``generator.Generator`` (validation, session lease: errors are
raised before any output). Its parts: ``SwarmDriver`` produces the tokens (and rebuilds the
Petals session after a swarm failure), ``TokenText`` turns them into text and decides when a stop
sequence ends it, ``TokenTimer`` times them, and the lease is the only way to the session. The
SSE endpoint streams the producer thread's events; cancelling (a client that went away) stops the
model at the next token and releases the session.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from services.common.errors import ApiError, SessionNotFound
from services.common.params import GenerateParams
from services.inference.decoding import IncrementalDecoder
from services.inference.driver import SwarmDriver, SwarmFailure
from services.inference.metrics import CACHED_PROMPT_TOKENS, GENERATED_TOKENS, PROMPT_TOKENS, TokenTimer
from services.inference.petals_model import PetalsModel
from services.inference.sessions import OneOffLease, SessionLease, held_token_ids
from services.inference.token_text import TokenText


@dataclass(frozen=True)
class TokenEvent:
    """One generated token and the text it released (may be empty)."""

    text: str
    generated_tokens: int


@dataclass(frozen=True)
class GenerationResult:
    """What one generate request produced."""

    text: str
    prompt_tokens: int  # sent through the swarm by this request
    cached_tokens: int  # already held by the session this request continued
    generated_tokens: int
    finish_reason: str  # "length", "stop" (a stop sequence), "eos" or "cancelled"
    stop_sequence: str | None
    seconds: float

    def summary(self) -> dict[str, Any]:
        """The final event of a stream."""
        return {
            "outputs": self.text,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "generated_tokens": self.generated_tokens,
            "finish_reason": self.finish_reason,
            "stop_sequence": self.stop_sequence,
            "seconds_per_token": self.seconds / self.generated_tokens if self.generated_tokens else None,
        }


class Generation:
    """One prepared generation; run it inline with ``run`` or in a thread with ``stream``."""

    def __init__(
        self,
        swarm: PetalsModel,
        lease: SessionLease | OneOffLease,
        params: GenerateParams,
        input_ids: list[int],
        new_tokens: int,
        decoder: IncrementalDecoder,
    ) -> None:
        self._swarm = swarm
        self._lease = lease
        self._input_ids = input_ids
        self._new_tokens = new_tokens
        self._cached_tokens = lease.token_count
        self._text = TokenText(decoder, params.stop)
        self._cancelled = threading.Event()
        self._driver = SwarmDriver(swarm, lease, swarm.logits_processors(params), self._should_stop)
        self._events: queue.Queue[TokenEvent | GenerationResult | Exception] = queue.Queue()
        self._timer = TokenTimer()

    def run(self) -> GenerationResult:
        """Generate in the calling thread; return the whole result."""
        try:
            self._generate()
            return self._finish()
        finally:
            self._cleanup()

    def stream(self) -> Iterator[TokenEvent | GenerationResult]:
        """Generate in a producer thread; yield token events, then the result."""
        threading.Thread(target=self._produce, name="generation", daemon=True).start()
        try:
            while True:
                event = self._events.get()
                if isinstance(event, Exception):
                    raise event
                yield event
                if isinstance(event, GenerationResult):
                    return
        finally:
            self._cancelled.set()  # the consumer left (done, or the client disconnected)

    def _produce(self) -> None:
        try:
            self._generate()
            self._events.put(self._finish())
        except Exception as error:
            self._events.put(error)
        finally:
            self._cleanup()

    def _should_stop(self) -> bool:
        return self._cancelled.is_set() or self._text.stopped

    def _on_tokens(self, token_ids: list[int]) -> None:
        self._timer.step()
        for token_id in token_ids:
            self._events.put(TokenEvent(self._text.push(token_id), self._text.count))

    def _generate(self) -> None:
        PROMPT_TOKENS.inc(len(self._input_ids))
        CACHED_PROMPT_TOKENS.inc(self._cached_tokens)
        try:
            self._driver.run(self._input_ids, self._new_tokens, self._on_tokens)
        except SwarmFailure as failure:
            raise self._failed(failure) from failure.__cause__
        finally:
            GENERATED_TOKENS.inc(self._text.count)

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
            finish_reason=self._text.finish_reason(cancelled=self._cancelled.is_set(), new_tokens=self._new_tokens),
            stop_sequence=self._text.stop_sequence,
            seconds=self._timer.elapsed,
        )

    def _cleanup(self) -> None:
        try:
            if self._lease.conversation and self._lease.petals is not None:
                self._lease.record_text(self._swarm.decode_all(held_token_ids(self._lease.petals)))
        finally:
            self._lease.release()
