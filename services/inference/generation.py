"""Text generation through the swarm, in a user's session or a one-off one.

Generation uses Petals' ``generate`` (Hugging Face's decoding strategies on top of a remote
inference session), so greedy output is token-for-token what ``transformers`` produces in
process. A streamer observes each new token: it measures token latency, feeds the session's
incremental decoder (only whole characters come out) and the stop-sequence matcher.

A ``Generation`` is prepared synchronously (validation, session lease: errors are raised
before any output) and then either run in the request's thread (v1: one JSON answer) or in a
producer thread whose events the SSE endpoint streams. Cancelling it (a client that went away)
stops the model at the next token and releases the session.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from services.common.errors import ApiError, InvalidParameter, SessionNotFound
from services.common.params import GenerateParams, Limits
from services.inference.decoding import IncrementalDecoder
from services.inference.metrics import GENERATED_TOKENS, PROMPT_TOKENS, TIME_TO_FIRST_TOKEN, TOKEN_LATENCY
from services.inference.model import ModelHandle
from services.inference.sessions import Session, SessionStore
from services.inference.stopping import StopMatcher

logger = logging.getLogger(__name__)


class SwarmFailure(ApiError):
    """The swarm could not complete a generation step."""

    http_status = "502 Bad Gateway"
    error_code = "swarm_error"


@dataclass(frozen=True)
class TokenEvent:
    """One generated token and the text it released (may be empty)."""

    text: str
    generated_tokens: int


@dataclass(frozen=True)
class GenerationResult:
    """What one generate request produced."""

    text: str
    prompt_tokens: int
    generated_tokens: int
    finish_reason: str  # "length", "stop" (a stop sequence), "eos" or "cancelled"
    stop_sequence: str | None
    seconds: float

    def summary(self) -> dict[str, Any]:
        """The final event of a stream."""
        return {
            "outputs": self.text,
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "finish_reason": self.finish_reason,
            "stop_sequence": self.stop_sequence,
            "seconds_per_token": self.seconds / self.generated_tokens if self.generated_tokens else None,
        }


class Generation:
    """One prepared generation; run it inline with ``run`` or in a thread with ``stream``."""

    def __init__(
        self,
        generator: Generator,
        params: GenerateParams,
        input_ids: list[int],
        new_tokens: int,
        petals_session: Any,
        decoder: IncrementalDecoder,
        session: Session | None,
    ) -> None:
        self._generator = generator
        self._params = params
        self._input_ids = input_ids
        self._new_tokens = new_tokens
        self._petals_session = petals_session
        self._decoder = decoder
        self._session = session
        self._stops = StopMatcher(params.stop)
        self._cancelled = threading.Event()
        self._events: queue.Queue = queue.Queue()
        self._count = 0
        self._seen_prompt = False
        self._pieces: list[str] = []
        self._started = self._last = time.perf_counter()

    # transformers' streamer interface --------------------------------------------------
    def put(self, value: Any) -> None:
        """Called by transformers with the prompt first, then with each new token."""
        if not self._seen_prompt:
            self._seen_prompt = True
            return
        now = time.perf_counter()
        TOKEN_LATENCY.observe(now - self._last)
        if self._count == 0:
            TIME_TO_FIRST_TOKEN.observe(now - self._started)
        self._last = now
        for token_id in value.reshape(-1).tolist():
            self._count += 1
            self._emit(self._stops.feed(self._decoder.push(token_id)))

    def end(self) -> None:
        """Required by the streamer interface."""

    # transformers' stopping-criteria interface ------------------------------------------
    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> bool:
        return self._cancelled.is_set() or self._stops.matched is not None

    # running -------------------------------------------------------------------------
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

    def _emit(self, text: str) -> None:
        self._pieces.append(text)
        self._events.put(TokenEvent(text, self._count))

    def _generate(self) -> None:
        import torch
        from transformers import StoppingCriteriaList

        model, params = self._generator.model, self._params
        inputs = torch.tensor([self._input_ids], dtype=torch.long, device=model.device) if self._input_ids else None
        options: dict[str, Any] = {"max_new_tokens": self._new_tokens, "do_sample": params.do_sample}
        if params.do_sample:
            options.update(temperature=params.temperature or 1.0, top_k=params.top_k, top_p=params.top_p)
        PROMPT_TOKENS.inc(len(self._input_ids))
        try:
            with torch.inference_mode():
                model.generate(
                    inputs,
                    session=self._petals_session,
                    streamer=self,
                    stopping_criteria=StoppingCriteriaList([self]),
                    pad_token_id=self._generator.tokenizer.pad_token_id,
                    **options,
                )
        except Exception as error:
            logger.exception("generation failed in the swarm")
            raise self._swarm_failure(error) from error
        finally:
            GENERATED_TOKENS.inc(self._count)

    def _swarm_failure(self, error: Exception) -> ApiError:
        failure = SwarmFailure(f"The Petals swarm failed during generation ({type(error).__name__})")
        if self._session is None:
            return failure
        # The Petals session's state is now unknown: retire it, in the words the original client
        # matches, so that it reopens a session and replays the dialogue.
        self._generator.store.close(self._session.session_id, reason="failed")
        return SessionNotFound(self._session.session_id, detail=f"{failure.message}.")

    def _finish(self) -> GenerationResult:
        if self._session is None:
            self._pieces.append(self._stops.feed(self._decoder.flush()))
        self._pieces.append(self._stops.finish())
        if self._stops.matched is not None:
            reason = "stop"
        elif self._cancelled.is_set():
            reason = "cancelled"
        else:
            reason = "length" if self._count >= self._new_tokens else "eos"
        return GenerationResult(
            text="".join(self._pieces),
            prompt_tokens=len(self._input_ids),
            generated_tokens=self._count,
            finish_reason=reason,
            stop_sequence=self._stops.matched,
            seconds=time.perf_counter() - self._started,
        )

    def _cleanup(self) -> None:
        if self._session is None:
            self._petals_session.close()
        else:
            self._generator.store.release(self._session)


class Generator:
    """Prepares generations against the model, in sessions from the store."""

    def __init__(self, model: ModelHandle, store: SessionStore, limits: Limits) -> None:
        self._model = model
        self.store = store
        self._limits = limits

    @property
    def model(self) -> Any:
        return self._model.model

    @property
    def tokenizer(self) -> Any:
        return self._model.tokenizer

    def prepare(self, params: GenerateParams) -> Generation:
        """Validate against the model and the session; raises ApiError before any output."""
        self._model.require_ready()
        input_ids = self.tokenizer(params.inputs, add_special_tokens=False)["input_ids"] if params.inputs else []
        if params.session_id is None:
            return self._prepare_once(params, input_ids)
        session = self.store.acquire(params.session_id)
        try:
            return self._prepare_in_session(session, params, input_ids)
        except BaseException:
            self.store.release(session)
            raise

    def generate(self, params: GenerateParams) -> GenerationResult:
        """Generate for one request in the calling thread (the v1 API)."""
        return self.prepare(params).run()

    def _prepare_once(self, params: GenerateParams, input_ids: list[int]) -> Generation:
        if not input_ids:
            raise InvalidParameter("inputs must contain at least one token")
        new_tokens = _new_token_budget(params, len(input_ids))
        total = len(input_ids) + new_tokens
        if total > self._limits.max_length:
            raise InvalidParameter(
                f"The prompt ({len(input_ids)} tokens) plus {new_tokens} new tokens exceeds "
                f"the limit of {self._limits.max_length} tokens"
            )
        decoder = IncrementalDecoder(self.tokenizer, input_ids)
        return Generation(self, params, input_ids, new_tokens, self._model.open_petals_session(total), decoder, None)

    def _prepare_in_session(self, session: Session, params: GenerateParams, input_ids: list[int]) -> Generation:
        held = session.token_count
        if held == 0 and not input_ids:
            raise InvalidParameter(f"Session {session.session_id} holds no tokens yet: send inputs first")
        new_tokens = _new_token_budget(params, held + len(input_ids))
        room = session.max_length - held - len(input_ids)
        if new_tokens > room:
            raise InvalidParameter(
                f"Session {session.session_id} holds {held} tokens of its max_length {session.max_length}; "
                f"with {len(input_ids)} new input tokens it has room for {max(room, 0)} more, not {new_tokens}. "
                "Open a session with a larger max_length."
            )
        if session.decoder is None or input_ids:
            session.decoder = IncrementalDecoder(self.tokenizer, input_ids)
        return Generation(self, params, input_ids, new_tokens, session.petals, session.decoder, session)


def _new_token_budget(params: GenerateParams, prefix_tokens: int) -> int:
    """How many tokens to generate: max_new_tokens, or max_length minus the prefix."""
    if params.max_new_tokens is not None:
        return params.max_new_tokens
    budget = params.max_length - prefix_tokens
    if budget <= 0:
        raise InvalidParameter(
            f"max_length {params.max_length} leaves no room for new tokens after the {prefix_tokens}-token prefix"
        )
    return budget
