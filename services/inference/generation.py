"""Text generation through the swarm, in a user's session or a one-off one.

Generation uses Petals' ``generate`` (Hugging Face's decoding strategies on top of a remote
inference session), so greedy output is token-for-token what ``transformers`` produces in
process. A streamer observes each new token: it measures token latency, feeds the session's
incremental decoder (only whole characters come out) and the stop-sequence matcher.

When the swarm fails mid-generation beyond what Petals recovers by itself (a server that died
leaves Petals 2.2 with "Broken input cache" on failover), the generation rebuilds its Petals
session in place: a fresh session, into which every token the old one held and every token
generated so far is replayed, then generation goes on where it stopped. The client sees a
pause, not an error, and the output is what it would have been (greedy, or seeded sampling,
whose generator carries on).

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
from services.common.replica_request import ReplicaRequest
from services.inference.decoding import IncrementalDecoder
from services.inference.metrics import (
    CACHED_PROMPT_TOKENS,
    CONVERSATION_LOOKUPS,
    GENERATED_TOKENS,
    PROMPT_TOKENS,
    SESSION_REBUILDS,
    TIME_TO_FIRST_TOKEN,
    TOKEN_LATENCY,
)
from services.inference.model import ModelHandle
from services.inference.sampling import SeededSampler
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
        held = petals_session.output_ids
        self._prefix_ids: list[int] = [] if held is None else held[0].tolist()  # held before this request
        self._reserved = session.max_length if session is not None else len(input_ids) + new_tokens
        self._cached_tokens = len(self._prefix_ids)
        self._generated: list[int] = []
        self._stops = StopMatcher(params.stop)
        self._cancelled = threading.Event()
        self._events: queue.Queue = queue.Queue()
        self._count = 0
        self._seen_prompt = False
        self._pieces: list[str] = []
        self._started = self._last = time.perf_counter()
        self._failure: Exception | None = None

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
            self._generated.append(token_id)
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
        from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

        params = self._params
        processors = LogitsProcessorList()
        if params.repetition_penalty is not None and params.repetition_penalty != 1.0:
            # Before sampling, as transformers orders it; the tokens it penalises are every token the
            # session holds (Petals passes them all to transformers), not only this request's.
            processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
        if params.do_sample:  # one sampler for the whole request: a rebuild continues its random stream
            processors.append(SeededSampler(params.temperature, params.top_k, params.top_p, params.seed))
        PROMPT_TOKENS.inc(len(self._input_ids))
        CACHED_PROMPT_TOKENS.inc(self._cached_tokens)
        try:
            self._run_model(self._input_ids, processors)
            for rebuild in range(1, MAX_REBUILDS + 1):
                if self._failure is None:
                    return
                if self._cancelled.is_set() or not self._generator.swarm_ready():
                    break
                logger.warning("swarm failure (%r): rebuilding the session, attempt %d", self._failure, rebuild)
                self._rebuild()
                self._run_model(self._prefix_ids + self._input_ids + self._generated, processors)
            if self._failure is not None:
                raise self._swarm_failure(self._failure) from self._failure
        finally:
            GENERATED_TOKENS.inc(self._count)

    def _run_model(self, token_ids: list[int], processors: Any) -> None:
        """Generate the tokens still due after ``token_ids`` (new to the session); a swarm
        failure is kept in ``_failure`` for the caller to recover from."""
        import torch
        from transformers import StoppingCriteriaList

        model = self._generator.model
        inputs = torch.tensor([token_ids], dtype=torch.long, device=model.device) if token_ids else None
        # All ones, as the swarm attends to every token: left to transformers, a pad token among the
        # inputs (typed as text, or generated earlier in the session) gets a 0, which Petals refuses.
        held = self._petals_session.output_ids
        length = (0 if held is None else held.shape[1]) + len(token_ids)
        attention_mask = torch.ones((1, length), dtype=torch.long, device=model.device)
        self._failure = None
        self._seen_prompt = False
        try:
            with torch.inference_mode():
                model.generate(
                    inputs,
                    attention_mask=attention_mask,
                    session=self._petals_session,
                    streamer=self,
                    stopping_criteria=StoppingCriteriaList([self]),
                    logits_processor=processors,
                    # given, it spares transformers re-deriving and comparing it from the model config on
                    # every call (~1-2 ms of a one-token request: what v1 per-token mode paid over raw)
                    generation_config=model.generation_config,
                    max_new_tokens=self._new_tokens - self._count,
                    do_sample=False,  # sampling, when asked for, is the SeededSampler's
                    pad_token_id=self._generator.tokenizer.pad_token_id,
                )
        except Exception as error:
            logger.warning("generation failed in the swarm", exc_info=True)
            self._failure = error

    def _rebuild(self) -> None:
        """Swap in a fresh Petals session (the next ``_run_model`` replays every token)."""
        broken, self._petals_session = self._petals_session, self._generator.open_petals_session(self._reserved)
        if self._session is not None:
            self._session.petals = self._petals_session
        threading.Thread(target=_close_quietly, args=(broken,), name="close-broken", daemon=True).start()
        SESSION_REBUILDS.inc()

    def _swarm_failure(self, error: Exception) -> ApiError:
        failure = SwarmFailure(f"The Petals swarm failed during generation ({type(error).__name__})")
        if self._session is None:
            return failure
        # The Petals session's state is now unknown: retire it, in the words the original client
        # matches, so that it reopens a session and replays the dialogue.
        self._generator.store.close(self._session.session_id, reason="failed")
        if self._session.conversation:
            return failure  # its client never saw a session id
        return SessionNotFound(self._session.session_id, detail=f"{failure.message}.")

    def _finish(self) -> GenerationResult:
        if self._session is None or self._session.conversation:  # no later call goes on from here
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
            cached_tokens=self._cached_tokens,
            generated_tokens=self._count,
            finish_reason=reason,
            stop_sequence=self._stops.matched,
            seconds=time.perf_counter() - self._started,
        )

    def _cleanup(self) -> None:
        if self._session is None:
            self._petals_session.close()
            return
        if self._session.conversation and self._session.petals is not None:
            self._session.text = self._generator.decode_all(self._session.petals.output_ids)
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

    def swarm_ready(self) -> bool:
        """Whether the last route check found the swarm serving every block."""
        return self._model.readiness()[0]

    def open_petals_session(self, max_length: int) -> Any:
        """A new Petals session reserving ``max_length`` tokens."""
        return self._model.open_petals_session(max_length)

    def decode_all(self, token_ids: Any) -> str:
        """The exact text of a session's tokens (``[1, n]`` tensor or None)."""
        if token_ids is None:
            return ""
        return self.tokenizer.decode(token_ids[0].tolist(), clean_up_tokenization_spaces=False)

    def prepare(self, request: ReplicaRequest) -> Generation:
        """Validate against the model and the session; raises ApiError before any output.

        A ``conversation`` request continues the conversation session whose text its ``inputs``
        extend (only the rest of the prompt goes through the swarm), or starts one.
        """
        self._model.require_model(request.model)
        self._model.require_ready()
        if request.conversation:
            return self._prepare_conversation(request)
        params = request.params
        input_ids = self._tokenize(params.inputs)
        if request.stop_token is not None:
            self._one_token(request.stop_token, "stop_sequence")
        if params.session_id is None:
            return self._prepare_once(request, input_ids)
        session = self.store.acquire(params.session_id)
        return self._prepare_acquired(session, request, input_ids)

    def generate(self, request: ReplicaRequest) -> GenerationResult:
        """Generate for one request in the calling thread (the v1 API)."""
        return self.prepare(request).run()

    def _new_decoder(self) -> IncrementalDecoder:
        return IncrementalDecoder(self._model.token_bytes)

    def _tokenize(self, text: str | None) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _prepare_acquired(self, session: Session, request: ReplicaRequest, input_ids: list[int]) -> Generation:
        try:
            return self._prepare_in_session(session, request, input_ids)
        except BaseException:
            self.store.release(session)
            raise

    def _prepare_conversation(self, request: ReplicaRequest) -> Generation:
        prompt = request.params.inputs
        if request.params.session_id is not None or not prompt:
            raise InvalidParameter("A conversation request needs inputs and no session_id")
        session = self.store.acquire_conversation(prompt)
        if session is not None:
            input_ids = self._tokenize(prompt[len(session.text) :])
            if self._fits(session, request, input_ids):
                CONVERSATION_LOOKUPS.labels(result="hit").inc()
                return self._prepare_acquired(session, request, input_ids)
            self.store.release(session)
        CONVERSATION_LOOKUPS.labels(result="miss").inc()
        input_ids = self._tokenize(prompt)
        needed = len(input_ids) + self._budget(request, len(input_ids), self._limits.max_length)
        size = min(self._limits.max_length, needed + CONVERSATION_ROOM)
        session = self.store.open(size, conversation=True, client=request.client)
        return self._prepare_acquired(self.store.acquire(session.session_id), request, input_ids)

    def _fits(self, session: Session, request: ReplicaRequest, input_ids: list[int]) -> bool:
        """Whether the session has room for the new inputs and the tokens the request asks for."""
        held = session.token_count + len(input_ids)
        try:
            return held + self._budget(request, held, session.max_length) <= session.max_length
        except InvalidParameter:  # no room at all
            return False

    def _prepare_once(self, request: ReplicaRequest, input_ids: list[int]) -> Generation:
        if not input_ids:
            raise InvalidParameter("inputs must contain at least one token")
        new_tokens = self._budget(request, len(input_ids), self._limits.max_length)
        total = len(input_ids) + new_tokens
        if total > self._limits.max_length:
            raise InvalidParameter(
                f"The prompt ({len(input_ids)} tokens) plus {new_tokens} new tokens exceeds "
                f"the limit of {self._limits.max_length} tokens"
            )
        petals_session = self.open_petals_session(total)
        return Generation(self, request.params, input_ids, new_tokens, petals_session, self._new_decoder(), None)

    def _prepare_in_session(self, session: Session, request: ReplicaRequest, input_ids: list[int]) -> Generation:
        held = session.token_count
        if held == 0 and not input_ids:
            raise InvalidParameter(f"Session {session.session_id} holds no tokens yet: send inputs first")
        new_tokens = self._budget(request, held + len(input_ids), session.max_length)
        room = session.max_length - held - len(input_ids)
        if new_tokens > room:
            raise InvalidParameter(
                f"Session {session.session_id} holds {held} tokens of its max_length {session.max_length}; "
                f"with {len(input_ids)} new input tokens it has room for {max(room, 0)} more, not {new_tokens}. "
                "Open a session with a larger max_length."
            )
        if request.replace_last_token is not None:
            self._replace_last_token(session, request.replace_last_token)
        if session.decoder is None or input_ids or request.replace_last_token is not None:
            session.decoder = self._new_decoder()  # new inputs: what the last answer left incomplete is moot
        return Generation(self, request.params, input_ids, new_tokens, session.petals, session.decoder, session)

    def _one_token(self, text: str, what: str) -> int:
        """The id of ``text``, which must be exactly one token of the model."""
        ids = self._tokenize(text)
        if len(ids) != 1:
            raise InvalidParameter(
                f"extra_stop_sequences require {what} to be exactly one token of the model; "
                f"{text!r} is {len(ids)} tokens"
            )
        return ids[0]

    def _replace_last_token(self, session: Session, text: str) -> None:
        """Make the session go on as if its last token had been ``text``'s one token. Petals has not
        sent a session's last token through the swarm yet (the next ``generate`` call does), so the
        servers' caches stay valid."""
        token = self._one_token(text, "stop_sequence")
        held = session.petals.output_ids
        if held is None or held.shape[1] == 0:
            raise InvalidParameter(f"Session {session.session_id} holds no token to replace")
        replaced = held.clone()
        replaced[0, -1] = token
        session.petals.output_ids = replaced

    def _budget(self, request: ReplicaRequest, prefix_tokens: int, capacity: int) -> int:
        """How many tokens to generate after ``prefix_tokens``, in a context of ``capacity`` tokens:
        max_new_tokens; or max_length minus the prefix; or (fill_context) what the context has left,
        up to MAX_NEW_TOKENS_LIMIT."""
        params = request.params
        if params.max_new_tokens is not None:
            return params.max_new_tokens
        if request.fill_context:
            budget, what = min(capacity - prefix_tokens, self._limits.max_new_tokens), f"the context of {capacity}"
        else:
            budget, what = params.max_length - prefix_tokens, f"max_length {params.max_length}"
        if budget <= 0:
            raise InvalidParameter(f"{what} leaves no room for new tokens after the {prefix_tokens}-token prefix")
        return budget


MAX_REBUILDS = 2  # in-place session rebuilds per request before the failure is reported


def _close_quietly(petals_session: Any) -> None:
    try:
        petals_session.close()
    except Exception:
        logger.debug("closing a broken Petals session failed", exc_info=True)


# Tokens a new conversation session reserves beyond its first request, for follow-up turns.
CONVERSATION_ROOM = 512
