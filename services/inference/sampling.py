"""Sampling with a per-request random generator, so that a ``seed`` reproduces an output.

``transformers`` samples with torch's global generator, which every concurrent request of the
replica shares: a seed set there would not hold. Instead generation runs in greedy mode with
this logits processor last: it applies temperature, top-k and top-p, draws one token with the
request's own ``torch.Generator`` and leaves only that token possible, so greedy picks it.
"""

from __future__ import annotations

import secrets
from typing import Any


class SeededSampler:
    """A ``transformers`` logits processor that samples the next token itself."""

    def __init__(self, temperature: float | None, top_k: int | None, top_p: float | None, seed: int | None) -> None:
        import torch
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        self._warpers: list[Any] = []
        if temperature is not None and temperature != 1.0:
            self._warpers.append(TemperatureLogitsWarper(temperature))
        if top_k is not None:
            self._warpers.append(TopKLogitsWarper(top_k))
        if top_p is not None and top_p < 1.0:
            self._warpers.append(TopPLogitsWarper(top_p))
        self._generator = torch.Generator().manual_seed(secrets.randbits(63) if seed is None else seed)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        for warper in self._warpers:
            scores = warper(input_ids, scores)
        probabilities = torch.softmax(scores.float(), dim=-1).cpu()
        chosen = torch.multinomial(probabilities, num_samples=1, generator=self._generator).to(scores.device)
        only_chosen = torch.full_like(scores, float("-inf"))
        return only_chosen.scatter(-1, chosen, 0.0)
