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

from collections.abc import Callable, Iterator
from functools import cached_property
from typing import Any

from services.common.api.params import GenerateParams
from services.common.api.token_options import TokenOptions
from services.inference import grouped_sessions
from services.inference.constraint import GrammarConstraint, GrammarTokenizer
from services.inference.model import ModelHandle
from services.inference.sampling import SeededSampler
from services.inference.scores import ScoreReader, TokenNames, prompt_entries
from services.inference.session_tokens import SessionTokens, TokenPrefix
from services.inference.shaping import CompletionPenalty, LogitBias

PROMPT_CHUNK = 64  # prompt positions whose logits are computed at once (a prompt's scores, echo)


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

    def logits_processors(
        self, params: GenerateParams, options: TokenOptions, start: int, reader: ScoreReader | None = None
    ) -> Any:
        """What shapes each step's choice; one set per request, so a rebuild continues its random stream.
        ``start``: how many tokens precede this request's generated ones (the penalties count those
        after); ``reader`` reads the scores after every shaping processor, before the sampler."""
        from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

        processors = LogitsProcessorList()
        if params.repetition_penalty is not None and params.repetition_penalty != 1.0:
            # Before sampling, as transformers orders it; the tokens it penalises are every token the
            # session holds (Petals passes them all to transformers), not only this request's.
            processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
        if options.presence_penalty or options.frequency_penalty:
            processors.append(CompletionPenalty(options.presence_penalty, options.frequency_penalty, start))
        if options.logit_bias:
            processors.append(LogitBias(options.logit_bias))
        if params.grammar is not None:  # after the other processors, before the sampler
            processors.append(GrammarConstraint(self._grammar_tokenizer, params.grammar))
        if reader is not None:
            processors.append(reader)
        if params.do_sample:
            processors.append(SeededSampler(params.temperature, params.top_k, params.top_p, params.seed))
        return processors

    def score_reader(self, top: int) -> ScoreReader:
        """A processor that reads each step's scores, with ``top`` alternatives per token."""
        return ScoreReader(self._token_names, top)

    def prompt_scores(self, hidden: Any, prompt: list[int], top: int) -> list[dict[str, Any]]:
        """OpenAI's entries for a prompt's tokens, from the hidden states ``[len(prompt), hidden]`` of
        its positions (the head applied to ``PROMPT_CHUNK`` positions at a time)."""
        head = self._model.model.get_output_embeddings()
        chunks = (head(hidden[start : start + PROMPT_CHUNK]) for start in range(0, len(prompt) - 1, PROMPT_CHUNK))
        return prompt_entries(self._token_names, chunks, prompt, top)

    @cached_property
    def end_of_sequence_ids(self) -> frozenset[int]:
        """The tokens after which generation ends."""
        return _end_of_sequence_ids(self._model.model.generation_config)

    @cached_property
    def _token_names(self) -> TokenNames:
        return TokenNames(self._model.tokenizer, self._model.token_bytes)

    def generate(
        self,
        petals_session: Any,
        token_ids: list[int],
        max_new_tokens: int,
        processors: Any,
        prompt_hidden: Callable[[Any], None] | None = None,
    ) -> Iterator[int]:
        """Send ``token_ids`` (new to the session), then yield up to ``max_new_tokens`` generated token
        ids, the last an end-of-sequence token if one comes. Closed early (a stop sequence, a client
        gone), the session holds what was generated so far. Raises whatever the swarm raised.
        ``prompt_hidden`` is called once with the hidden states of every position of the first step
        (in the step's inference mode)."""
        import torch

        model, device = self._model.model, self._device
        tokens = SessionTokens(petals_session)
        held = tokens.snapshot()
        added = list(token_ids)  # what this call adds to the session
        feed = [held.last(), *token_ids] if len(held) else token_ids  # its last token was never sent
        end_ids = self.end_of_sequence_ids
        try:
            for _ in range(max_new_tokens):
                with torch.inference_mode(), model.use_session(petals_session):  # per step: nothing spans a yield
                    hidden = model.base_model(input_ids=torch.tensor([feed], device=device)).last_hidden_state
                    if prompt_hidden is not None:
                        prompt_hidden(hidden[0])
                        prompt_hidden = None
                    scores = _last_token_scores(model, hidden)
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
            grouped_sessions.generation_ended(petals_session)

    def prefill(self, petals_session: Any, token_ids: list[int]) -> None:
        """Make a fresh session hold ``token_ids`` (a handed-over session): all but the last go through
        the swarm in one step, as a rebuild replays them; the last waits for the next step, as usual."""
        import torch

        model, device = self._model.model, self._device
        if len(token_ids) > 1:
            with torch.inference_mode(), model.use_session(petals_session):
                model.base_model(input_ids=torch.tensor([token_ids[:-1]], device=device))
        SessionTokens(petals_session).restore(TokenPrefix(None), list(token_ids), device)

    @cached_property
    def _grammar_tokenizer(self) -> GrammarTokenizer:
        """The model's tokenizer as llguidance reads it, for requests with a grammar."""
        return GrammarTokenizer(self._model.tokenizer, self._model.model.config.vocab_size)

    @cached_property
    def _device(self) -> Any:
        """The client's device (transformers' ``model.device`` walks the parameters on every call)."""
        return self._model.model.device


def _last_token_scores(model: Any, hidden: Any) -> Any:
    """The float32 scores ``[1, vocabulary]`` of the token after a step's hidden states."""
    # The head on the last position only, as a [1, hidden] matrix: a [1, 1, hidden] view of a longer
    # sequence keeps its strides, and torch's bfloat16 product then takes a path 40x slower.
    return model.get_output_embeddings()(hidden[:, -1]).float()


def _end_of_sequence_ids(generation_config: Any) -> frozenset[int]:
    """The tokens after which the model's generation config ends generation."""
    ids = generation_config.eos_token_id
    return frozenset() if ids is None else frozenset([ids] if isinstance(ids, int) else ids)
