"""Token scores as OpenAI returns them (``logprobs``): read from the scores the request's logits
processors shaped, before sampling draws a token.

``ScoreReader`` sits in the processor chain just before the sampler (or last, greedy): it keeps
the step's log-softmax, and after the token is chosen ``entry`` gives OpenAI's chat entry for it:
``{"token", "logprob", "bytes", "top_logprobs": [...]}``. So temperature, top-k and top-p do not
change the scores (OpenAI's logprobs do not depend on them either); penalties, bias and any
constraint before it do. ``prompt_entries`` scores a prompt from the logits of all its positions,
chunk by chunk.
A score of minus infinity (a token no processor lets through) is reported as -9999.0, as OpenAI does.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from services.inference.decoding import TokenBytes

IMPOSSIBLE = -9999.0  # OpenAI's stand-in for a token that cannot come (JSON has no -inf)


class TokenNames:
    """Each token's text and bytes as OpenAI shows them: its bytes (a special token: its name)."""

    def __init__(self, tokenizer: Any, token_bytes: TokenBytes) -> None:
        self._tokenizer = tokenizer
        self._token_bytes = token_bytes

    def describe(self, token_id: int, logprob: float | None) -> dict[str, Any]:
        """``{"token", "logprob", "bytes"}`` of one token (``logprob`` None: unscored, a prompt's first)."""
        data = self._token_bytes[token_id] or (self._tokenizer.convert_ids_to_tokens(token_id) or "").encode()
        score = logprob if logprob is None or logprob > IMPOSSIBLE else IMPOSSIBLE
        return {"token": data.decode("utf-8", errors="replace"), "logprob": score, "bytes": list(data)}


class ScoreReader:
    """A logits processor that keeps the step's log-probabilities and leaves the scores as they are."""

    def __init__(self, names: TokenNames, top: int) -> None:
        self._names = names
        self._top = top
        self._logprobs: Any = None

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        self._logprobs = torch.log_softmax(scores.float(), dim=-1)[0]
        return scores

    def logprob(self, token_id: int) -> float:
        """The last step's log-probability of ``token_id``."""
        return float(self._logprobs[token_id])

    def entry(self, token_id: int) -> dict[str, Any]:
        """OpenAI's chat entry for the token the last step chose."""
        return entry(self._names, self._logprobs, token_id, self._top)


def entry(names: TokenNames, logprobs: Any, token_id: int, top: int) -> dict[str, Any]:
    """OpenAI's entry for ``token_id`` at one position whose log-probabilities are ``logprobs``."""
    import torch

    chosen = names.describe(token_id, float(logprobs[token_id]))
    if top == 0:
        return {**chosen, "top_logprobs": []}
    values, ids = torch.topk(logprobs, top)
    alternatives = [names.describe(int(i), float(v)) for v, i in zip(values.tolist(), ids.tolist(), strict=True)]
    return {**chosen, "top_logprobs": alternatives}


def prompt_entries(names: TokenNames, logits: Iterable[Any], prompt: list[int], top: int) -> list[dict[str, Any]]:
    """The prompt's entries from the logits of its positions, given in chunks of rows (``[k,
    vocabulary]`` each, in order; so a long prompt's logits are never all in memory at once): the
    first token unscored (nothing precedes it: ``logprob`` and ``top_logprobs`` None), then each
    token scored at the position before it."""
    import torch

    entries = [{**names.describe(prompt[0], None), "top_logprobs": None}]
    for chunk in logits:
        for row in torch.log_softmax(chunk.float(), dim=-1):
            if len(entries) == len(prompt):
                return entries
            entries.append(entry(names, row, prompt[len(entries)], top))
    return entries
