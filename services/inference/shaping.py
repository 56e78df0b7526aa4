"""The OpenAI API's logit shaping as ``transformers`` logits processors: presence and frequency
penalties, and ``logit_bias``.

OpenAI's definition (its "Parameter details"): for each token j,
``logit[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty``, where
``count[j]`` is how often j was generated so far in this completion (the prompt does not count,
as in vLLM); then ``logit[j] += logit_bias[j]``. Both run after ``repetition_penalty`` and before
the scores are read (services/inference/scores.py) and sampled.
"""

from __future__ import annotations

from typing import Any


class CompletionPenalty:
    """Presence and frequency penalties over the tokens generated after the first ``start`` ones."""

    def __init__(self, presence: float, frequency: float, start: int) -> None:
        self._presence = presence
        self._frequency = frequency
        self._start = start

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        generated = input_ids[0, self._start :]
        if generated.numel() == 0:
            return scores
        counts = torch.bincount(generated, minlength=scores.shape[-1])[: scores.shape[-1]].to(scores.dtype)
        return scores - counts * self._frequency - (counts > 0).to(scores.dtype) * self._presence


class LogitBias:
    """Adds a fixed bias to the scores of some tokens."""

    def __init__(self, biases: tuple[tuple[int, float], ...]) -> None:
        self._ids = [token for token, _ in biases]
        self._biases = [bias for _, bias in biases]

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        biased = scores.clone()
        biased[..., self._ids] += torch.tensor(self._biases, dtype=scores.dtype, device=scores.device)
        return biased
