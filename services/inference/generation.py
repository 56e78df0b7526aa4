"""Text generation through the swarm, in a user's session or a one-off one.

Generation uses Petals' ``generate`` (Hugging Face's decoding strategies on top of a remote
inference session), so greedy output is token-for-token what ``transformers`` produces in
process. A streamer observes each new token: it measures token latency and feeds the
session's incremental decoder, so only complete characters are returned.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from services.common.errors import ApiError, InvalidParameter, SessionNotFound
from services.common.params import GenerateParams, Limits
from services.inference.decoding import IncrementalDecoder
from services.inference.metrics import GENERATED_TOKENS, PROMPT_TOKENS, TIME_TO_FIRST_TOKEN, TOKEN_LATENCY
from services.inference.model import ModelHandle
from services.inference.sessions import Session, SessionStore

logger = logging.getLogger(__name__)


class SwarmFailure(ApiError):
    """The swarm could not complete a generation step."""

    http_status = "502 Bad Gateway"
    code = "swarm_error"


@dataclass(frozen=True)
class GenerationResult:
    """What one generate request produced."""

    text: str
    prompt_tokens: int
    generated_tokens: int


class _TokenObserver:
    """A transformers streamer: times each new token and decodes it incrementally."""

    def __init__(self, decoder: IncrementalDecoder) -> None:
        self._decoder = decoder
        self._seen_prompt = False
        self._last = time.perf_counter()
        self.pieces: list[str] = []
        self.count = 0

    def put(self, value: Any) -> None:
        if not self._seen_prompt:  # transformers first passes the whole prompt
            self._seen_prompt = True
            return
        now = time.perf_counter()
        TOKEN_LATENCY.observe(now - self._last)
        if self.count == 0:
            TIME_TO_FIRST_TOKEN.observe(now - self._last)
        self._last = now
        self.count += 1
        for token_id in value.reshape(-1).tolist():
            self.pieces.append(self._decoder.push(token_id))

    def end(self) -> None:
        """Required by the streamer interface; nothing to finish."""


class Generator:
    """Runs generate requests against the model, in sessions from the store."""

    def __init__(self, model: ModelHandle, store: SessionStore, limits: Limits) -> None:
        self._model = model
        self._store = store
        self._limits = limits

    def generate(self, params: GenerateParams) -> GenerationResult:
        """Generate for one request; the text returned is the new text only."""
        self._model.require_ready()
        input_ids = self._tokenize(params.inputs)
        if params.session_id is None:
            return self._generate_once(params, input_ids)
        with self._store.lease(params.session_id) as session:
            return self._generate_in_session(session, params, input_ids)

    def _tokenize(self, text: str | None) -> list[int]:
        if not text:
            return []
        return self._model.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _generate_once(self, params: GenerateParams, input_ids: list[int]) -> GenerationResult:
        if not input_ids:
            raise InvalidParameter("inputs must contain at least one token")
        new_tokens = _new_token_budget(params, len(input_ids))
        total = len(input_ids) + new_tokens
        if total > self._limits.max_length:
            raise InvalidParameter(
                f"The prompt ({len(input_ids)} tokens) plus {new_tokens} new tokens exceeds "
                f"the limit of {self._limits.max_length} tokens"
            )
        petals_session = self._model.open_petals_session(total)
        try:
            decoder = IncrementalDecoder(self._model.tokenizer, input_ids)
            observer = self._run(petals_session, decoder, input_ids, new_tokens, params)
            text = "".join(observer.pieces) + decoder.flush()
        finally:
            petals_session.close()
        return GenerationResult(text, len(input_ids), observer.count)

    def _generate_in_session(self, session: Session, params: GenerateParams, input_ids: list[int]) -> GenerationResult:
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
            session.decoder = IncrementalDecoder(self._model.tokenizer, input_ids)
        try:
            observer = self._run(session.petals, session.decoder, input_ids, new_tokens, params)
        except SwarmFailure as failure:
            # The Petals session's state is now unknown: retire it, and say so in the words the
            # original client matches, so it reopens a session and replays the dialogue.
            self._store.close(session.session_id, reason="failed")
            raise SessionNotFound(session.session_id, detail=f"{failure.message}.") from failure
        return GenerationResult("".join(observer.pieces), len(input_ids), observer.count)

    def _run(
        self,
        petals_session: Any,
        decoder: IncrementalDecoder,
        input_ids: list[int],
        new_tokens: int,
        params: GenerateParams,
    ) -> _TokenObserver:
        import torch

        model = self._model.model
        inputs = torch.tensor([input_ids], dtype=torch.long, device=model.device) if input_ids else None
        observer = _TokenObserver(decoder)
        options: dict[str, Any] = {"max_new_tokens": new_tokens, "do_sample": params.do_sample}
        if params.do_sample:
            options.update(temperature=params.temperature or 1.0, top_k=params.top_k, top_p=params.top_p)
        PROMPT_TOKENS.inc(len(input_ids))
        try:
            with torch.inference_mode():
                model.generate(
                    inputs,
                    session=petals_session,
                    streamer=observer,
                    pad_token_id=self._model.tokenizer.pad_token_id,
                    **options,
                )
        except Exception as error:
            logger.exception("generation failed in the swarm")
            raise SwarmFailure(f"The Petals swarm failed during generation ({type(error).__name__})") from error
        finally:
            GENERATED_TOKENS.inc(observer.count)
        return observer


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
