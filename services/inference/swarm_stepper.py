"""Steps Petals sessions through the swarm token by token, in plain token ids: the model as generation sees it.

Each step sends the new tokens through the swarm (the session's servers keep the attention
caches), applies the client's head to the last position only, lets the request's logits
processors shape the scores and takes the best token: greedy decoding as ``transformers``
does it, so output is token-for-token what the model produces in process. This loop replaces
Petals' ``generate`` (Hugging Face's), whose per-call set-up (generation config copied and
validated, keyword arguments inspected, processors built) cost about 1 ms of CPU per request: a
third of what one-token-per-request (v1) clients paid over the raw client. It is an iterator, so
generation runs in the request's own thread, paced by its client, and stops when closed. The
session's state is Petals' own (its tokens, read and written through session_tokens.py), so a
session stepped here and one stepped by ``generate`` are interchangeable.
Everything torch and transformers take stays in this module and session_tokens.py; the rest of
generation deals in lists and iterators of token ids.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cached_property
from typing import Any

from services.common.api.params import GenerateParams
from services.inference.constraint import GrammarConstraint, GrammarTokenizer
from services.inference.model import ModelHandle
from services.inference.sampling import SeededSampler
from services.inference.session_tokens import SessionTokens


class SwarmStepper:
    """Steps Petals sessions through the swarm with the loaded model; reports readiness and opens sessions."""

    def __init__(self, model: ModelHandle) -> None:
        self._model = model

    def swarm_ready(self) -> bool:
        """Whether the last route check found the swarm serving every block."""
        return self._model.readiness()[0]

    def open_petals_session(self, max_length: int) -> Any:
        """A new Petals session reserving ``max_length`` tokens."""
        return self._model.open_petals_session(max_length)

    def decode_all(self, token_ids: list[int]) -> str:
        """The exact text of a session's tokens."""
        return self._model.tokenizer.decode(token_ids, clean_up_tokenization_spaces=False)

    def logits_processors(self, params: GenerateParams) -> Any:
        """What shapes each step's choice; one set per request, so a rebuild continues its random stream."""
        from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

        processors = LogitsProcessorList()
        if params.repetition_penalty is not None and params.repetition_penalty != 1.0:
            # Before sampling, as transformers orders it; the tokens it penalises are every token the
            # session holds (Petals passes them all to transformers), not only this request's.
            processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
        if params.grammar is not None:  # after the other processors, before the sampler
            processors.append(GrammarConstraint(self._grammar_tokenizer, params.grammar))
        if params.do_sample:
            processors.append(SeededSampler(params.temperature, params.top_k, params.top_p, params.seed))
        return processors

    def generate(
        self, petals_session: Any, token_ids: list[int], max_new_tokens: int, processors: Any
    ) -> Iterator[int]:
        """Send ``token_ids`` (new to the session), then yield up to ``max_new_tokens`` generated token
        ids, the last an end-of-sequence token if one comes. Closed early (a stop sequence, a client
        gone), the session holds what was generated so far. Raises whatever the swarm raised."""
        import torch

        model, device = self._model.model, self._device
        tokens = SessionTokens(petals_session)
        held = tokens.snapshot()
        added = list(token_ids)  # what this call adds to the session
        feed = [held.last(), *token_ids] if len(held) else token_ids  # its last token was never sent
        end_ids = _end_of_sequence_ids(model.generation_config)
        try:
            for _ in range(max_new_tokens):
                with torch.inference_mode(), model.use_session(petals_session):  # per step: nothing spans a yield
                    scores = _next_token_scores(model, feed, device)
                    if processors:
                        scores = processors(held.followed_by(added, device), scores)
                token = int(scores.argmax(-1))
                added.append(token)
                yield token
                if token in end_ids:
                    return
                feed = [token]
        finally:
            tokens.restore(held, added, device)

    @cached_property
    def _grammar_tokenizer(self) -> GrammarTokenizer:
        """The model's tokenizer as llguidance reads it, for requests with a grammar."""
        return GrammarTokenizer(self._model.tokenizer, self._model.model.config.vocab_size)

    @cached_property
    def _device(self) -> Any:
        """The client's device (transformers' ``model.device`` walks the parameters on every call)."""
        return self._model.model.device


def _next_token_scores(model: Any, feed: list[int], device: Any) -> Any:
    """One step through the swarm: the float32 scores ``[1, vocabulary]`` of the token after ``feed``."""
    import torch

    hidden = model.base_model(input_ids=torch.tensor([feed], device=device)).last_hidden_state
    # The head on the last position only, as a [1, hidden] matrix: a [1, 1, hidden] view of a longer
    # sequence keeps its strides, and torch's bfloat16 product then takes a path 40x slower.
    return model.get_output_embeddings()(hidden[:, -1]).float()


def _end_of_sequence_ids(generation_config: Any) -> frozenset[int]:
    """The tokens after which the model's generation config ends generation."""
    ids = generation_config.eos_token_id
    return frozenset() if ids is None else frozenset([ids] if isinstance(ids, int) else ids)
