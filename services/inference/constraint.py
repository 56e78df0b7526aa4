"""Constrained decoding: a request's grammar (services/common/api/grammar.py) enforced token by token.

``GrammarConstraint`` is a ``transformers`` logits processor holding llguidance's matcher for one
request: at each step it first feeds the matcher the tokens chosen since its last call, then
leaves possible only the tokens the grammar allows next (once the grammar is complete, only the
end-of-sequence token). It runs after the request's other processors (penalties) and before the
sampler, so greedy and seeded sampling alike pick an allowed token. llguidance computes the mask
as a bitmap over the vocabulary (about 0.1 ms a token on SmolLM2's 49,152 tokens; figures in
docs/benchmarks.md); the tokenizer it needs is read once per model (``GrammarTokenizer``).
"""

from __future__ import annotations

import threading
from typing import Any


class GrammarTokenizer:
    """llguidance's view of a model's tokenizer, built on first use (about 0.25 s for SmolLM2)."""

    def __init__(self, tokenizer: Any, vocabulary: int) -> None:
        self._tokenizer = tokenizer
        self.vocabulary = vocabulary  # the width of the model's logits
        self._built: Any = None
        self._lock = threading.Lock()

    def get(self) -> Any:
        """The ``llguidance.LLTokenizer``."""
        with self._lock:
            if self._built is None:
                import llguidance.hf

                self._built = llguidance.hf.from_tokenizer(self._tokenizer, n_vocab=self.vocabulary)
            return self._built


class GrammarConstraint:
    """A logits processor that masks every token the grammar does not allow next."""

    def __init__(self, tokenizer: GrammarTokenizer, grammar: str) -> None:
        import numpy as np
        from llguidance import LLMatcher

        self._matcher = LLMatcher(tokenizer.get(), grammar, log_level=0)
        self._bits = np.zeros((tokenizer.vocabulary + 31) // 32, dtype=np.int32)
        self._eos = tokenizer.get().eos_token
        self._seen: int | None = None  # tokens of input_ids already fed to the matcher (None: the prompt's)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        """``scores`` [1, vocabulary] with every token the grammar forbids set to -inf."""
        import numpy as np
        import torch

        self._consume(input_ids[0])
        if self._matcher.is_error():  # cannot happen with this mask; end the answer rather than go on unconstrained
            allowed = np.zeros(scores.shape[-1], dtype=bool)
            allowed[self._eos] = True
        else:
            self._matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
            allowed = np.unpackbits(self._bits.view(np.uint8), bitorder="little")[: scores.shape[-1]].astype(bool)
        return scores.masked_fill(torch.from_numpy(~allowed).to(scores.device), float("-inf"))

    def _consume(self, ids: Any) -> None:
        """Feed the tokens generated since the last step (the first step starts after the prompt)."""
        if self._seen is not None:
            for token in ids[self._seen :].tolist():
                self._matcher.consume_token(token)
        self._seen = int(ids.shape[-1])
