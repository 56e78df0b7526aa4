"""Plans generations: validation against the model and the session, the session's lease, the token budget.

Every error is raised here, before any output: the endpoint can still answer with its real
status. A request continues a user's session (by id), a conversation session (by the text its
prompt extends), or gets a Petals session of its own.
"""

from __future__ import annotations

from services.common.api.params import Limits
from services.common.api.replica_request import ReplicaRequest
from services.common.web.errors import InvalidParameter, SessionFull
from services.inference.decoding import IncrementalDecoder
from services.inference.generation import Generation, GenerationResult
from services.inference.metrics import CONVERSATION_LOOKUPS
from services.inference.model import ModelHandle
from services.inference.sessions import SessionLease, SessionStore
from services.inference.swarm_stepper import SwarmStepper


class GenerationPlanner:
    """Plans each request's generation: validates it, leases its session and budgets its new tokens."""

    def __init__(self, model: ModelHandle, store: SessionStore, limits: Limits) -> None:
        self._model = model
        self._stepper = SwarmStepper(model)
        self._store = store
        self._limits = limits

    def prepare(self, request: ReplicaRequest) -> Generation:
        """Validate against the model and the session; raises ApiError before any output.

        A ``conversation`` request continues the conversation session whose text its ``inputs``
        extend (only the rest of the prompt goes through the swarm), or starts one.
        """
        self._model.require_model(request.model)
        self._model.require_ready()
        self._check_options(request)
        if request.conversation:
            return self._prepare_conversation(request)
        params = request.params
        input_ids = self._tokenize(params.inputs)
        if request.stop_token is not None:
            self._one_token(request.stop_token, "stop_sequence")
        if params.session_id is None:
            return self._prepare_once(request, input_ids)
        return self._prepare_leased(self._store.acquire(params.session_id, request.client), request, input_ids)

    def _check_options(self, request: ReplicaRequest) -> None:
        """The OpenAI options: known token ids; prompt scores only for a whole prompt of its own."""
        options = request.options
        self._model.require_token_ids((token for token, _ in options.logit_bias), "logit_bias")
        if options.prompt_logprobs and (request.conversation or request.params.session_id is not None):
            raise InvalidParameter("prompt_logprobs needs a request without a session or conversation")

    def generate(self, request: ReplicaRequest) -> GenerationResult:
        """Generate for one request in the calling thread (the v1 API)."""
        return self.prepare(request).run()

    def _new_decoder(self) -> IncrementalDecoder:
        return IncrementalDecoder(self._model.token_bytes)

    def _tokenize(self, text: str | None) -> list[int]:
        return self._model.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _prepare_leased(self, lease: SessionLease, request: ReplicaRequest, input_ids: list[int]) -> Generation:
        try:
            return self._prepare_in_session(lease, request, input_ids)
        except BaseException:
            lease.release()
            raise

    def _prepare_conversation(self, request: ReplicaRequest) -> Generation:
        prompt = request.params.inputs
        if request.params.session_id is not None or not prompt:
            raise InvalidParameter("A conversation request needs inputs and no session_id")
        lease = self._store.acquire_conversation(prompt, request.client)
        if lease is not None:
            input_ids = self._tokenize(prompt[len(lease.text) :])
            if self._fits(lease, request, input_ids):
                CONVERSATION_LOOKUPS.labels(result="hit").inc()
                return self._prepare_leased(lease, request, input_ids)
            lease.release()
        CONVERSATION_LOOKUPS.labels(result="miss").inc()
        input_ids = self._tokenize(prompt)
        needed = len(input_ids) + self._budget(request, len(input_ids), self._model.max_length)
        size = min(self._model.max_length, needed + CONVERSATION_ROOM)
        session = self._store.open(size, conversation=True, client=request.client, affinity=request.affinity)
        return self._prepare_leased(self._store.acquire(session.session_id, request.client), request, input_ids)

    def _fits(self, lease: SessionLease, request: ReplicaRequest, input_ids: list[int]) -> bool:
        """Whether the session has room for the new inputs and the tokens the request asks for."""
        held = lease.token_count + len(input_ids)
        try:
            return held + self._budget(request, held, lease.max_length) <= lease.max_length
        except InvalidParameter:  # no room at all
            return False

    def _prepare_once(self, request: ReplicaRequest, input_ids: list[int]) -> Generation:
        if not input_ids:
            raise InvalidParameter("inputs must contain at least one token")
        new_tokens = self._budget(request, len(input_ids), self._model.max_length)
        total = len(input_ids) + new_tokens
        self._model.require_length(total, f"The prompt ({len(input_ids)} tokens) plus {new_tokens} new tokens")
        lease = self._store.open_one_off(total)
        decoder = self._new_decoder()
        return Generation(self._stepper, lease, request.params, input_ids, new_tokens, decoder, request.options)

    def _prepare_in_session(self, lease: SessionLease, request: ReplicaRequest, input_ids: list[int]) -> Generation:
        held = lease.token_count
        if held == 0 and not input_ids:
            raise InvalidParameter(f"Session {lease.session_id} holds no tokens yet: send inputs first")
        new_tokens = self._budget(request, held + len(input_ids), lease.max_length)
        room = lease.max_length - held - len(input_ids)
        if new_tokens > room:
            raise SessionFull(
                f"Session {lease.session_id} holds {held} tokens of its max_length {lease.max_length}; "
                f"with {len(input_ids)} new input tokens it has room for {max(room, 0)} more, not {new_tokens}. "
                "Open a session with a larger max_length."
            )
        if request.replace_last_token is not None:
            self._replace_last_token(lease, request.replace_last_token)
        if lease.decoder is None or input_ids or request.replace_last_token is not None:
            lease.decoder = self._new_decoder()  # new inputs: what the last answer left incomplete is moot
        return Generation(self._stepper, lease, request.params, input_ids, new_tokens, lease.decoder, request.options)

    def _one_token(self, text: str, what: str) -> int:
        """The id of ``text``, which must be exactly one token of the model."""
        ids = self._tokenize(text)
        if len(ids) != 1:
            raise InvalidParameter(
                f"extra_stop_sequences require {what} to be exactly one token of the model; "
                f"{text!r} is {len(ids)} tokens"
            )
        return ids[0]

    def _replace_last_token(self, lease: SessionLease, text: str) -> None:
        """Make the session go on as if its last token had been ``text``'s one token. Petals has not
        sent a session's last token through the swarm yet (the next ``generate`` call does), so the
        servers' caches stay valid."""
        token = self._one_token(text, "stop_sequence")
        if lease.token_count == 0:
            raise InvalidParameter(f"Session {lease.session_id} holds no token to replace")
        lease.tokens.replace_last(token)

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


# Tokens a new conversation session reserves beyond its first request, for follow-up turns.
CONVERSATION_ROOM = 512
