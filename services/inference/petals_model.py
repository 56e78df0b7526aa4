"""The model as generation sees it: Petals' ``generate`` over one Petals session, in plain token ids.

Petals' ``generate`` is Hugging Face's decoding on top of a remote inference session, so greedy
output is token-for-token what ``transformers`` produces in process. Everything torch and
transformers take (tensors, the streamer and stopping-criteria interfaces, logits processors) stays
in this module; the rest of generation deals in lists of ids and callbacks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from services.common.params import GenerateParams
from services.inference.model import ModelHandle
from services.inference.sampling import SeededSampler
from services.inference.sessions import held_token_count

TokensCallback = Callable[[list[int]], None]


class PetalsModel:
    """Generates through the swarm with the loaded model; reports readiness and opens Petals sessions."""

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
        if params.do_sample:
            processors.append(SeededSampler(params.temperature, params.top_k, params.top_p, params.seed))
        return processors

    def generate(
        self,
        petals_session: Any,
        token_ids: list[int],
        max_new_tokens: int,
        processors: Any,
        on_tokens: TokensCallback,
        should_stop: Callable[[], bool],
    ) -> None:
        """Send ``token_ids`` (new to the session) and generate up to ``max_new_tokens`` after them,
        calling ``on_tokens`` with each step's ids; raises whatever the swarm raised."""
        import torch
        from transformers import StoppingCriteriaList

        model = self._model.model
        inputs = torch.tensor([token_ids], dtype=torch.long, device=model.device) if token_ids else None
        # All ones, as the swarm attends to every token: left to transformers, a pad token among the
        # inputs (typed as text, or generated earlier in the session) gets a 0, which Petals refuses.
        length = held_token_count(petals_session) + len(token_ids)
        attention_mask = torch.ones((1, length), dtype=torch.long, device=model.device)
        hooks = _Hooks(on_tokens, should_stop)
        with torch.inference_mode():
            model.generate(
                inputs,
                attention_mask=attention_mask,
                session=petals_session,
                streamer=hooks,
                stopping_criteria=StoppingCriteriaList([hooks]),
                logits_processor=processors,
                # given, it spares transformers re-deriving and comparing it from the model config on
                # every call (~1-2 ms of a one-token request: what v1 per-token mode paid over raw)
                generation_config=model.generation_config,
                max_new_tokens=max_new_tokens,
                do_sample=False,  # sampling, when asked for, is the SeededSampler's
                pad_token_id=self._model.tokenizer.pad_token_id,
            )


class _Hooks:
    """transformers' streamer (prompt first, then each step's tokens) and stopping criterion."""

    def __init__(self, on_tokens: TokensCallback, should_stop: Callable[[], bool]) -> None:
        self._on_tokens = on_tokens
        self._should_stop = should_stop
        self._seen_prompt = False

    def put(self, value: Any) -> None:
        if not self._seen_prompt:
            self._seen_prompt = True
            return
        self._on_tokens(value.reshape(-1).tolist())

    def end(self) -> None:
        """Required by the streamer interface."""

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> bool:
        return self._should_stop()
