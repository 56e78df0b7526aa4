"""OpenAI's per-token options a replica takes: scores (``logprobs``) and logit shaping (penalties, bias).

The gateway reads them from OpenAI's fields (services/gateway/openai_params.py) and sends them
in a ``ReplicaRequest``; the replica parses them back here with the same ranges:

- ``logprobs``: None for no scores; k (0-20) for each generated token's log-probability and its
  k most likely alternatives, read after the request's logits processors, before sampling;
- ``prompt_logprobs``: the prompt's tokens' scores too (``echo`` on ``/v1/completions``);
- ``presence_penalty``, ``frequency_penalty`` (-2 to 2) and ``logit_bias`` (token id -> -100 to
  100), with OpenAI's meaning (services/inference/shaping.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from services.common.api.params import Range, get_bool, get_float, get_int
from services.common.web.errors import InvalidParameter

TOP_LOGPROBS = Range(0, 20)  # chat's top_logprobs, and the alternatives a replica returns
COMPLETION_LOGPROBS = Range(0, 5)  # /v1/completions' logprobs (OpenAI's limit)
PENALTY = Range(-2.0, 2.0)  # presence and frequency penalties
LOGIT_BIAS = Range(-100.0, 100.0)
MAX_LOGIT_BIAS_ENTRIES = 300
TOKEN_ID = Range(0, 2**31 - 1)  # a replica checks it against its vocabulary


@dataclass(frozen=True)
class TokenOptions:
    """Scores to return and shaping to apply, per generated token."""

    logprobs: int | None = None  # None: no scores; k: the chosen token's and k alternatives'
    prompt_logprobs: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), ids unique

    @property
    def shapes_logits(self) -> bool:
        """Whether any penalty or bias applies."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)

    def to_json(self) -> dict[str, Any]:
        """The fields a replica request carries (none when all are off)."""
        body: dict[str, Any] = {}
        if self.logprobs is not None:
            body["logprobs"] = self.logprobs
        if self.prompt_logprobs:
            body["prompt_logprobs"] = True
        if self.presence_penalty:
            body["presence_penalty"] = self.presence_penalty
        if self.frequency_penalty:
            body["frequency_penalty"] = self.frequency_penalty
        if self.logit_bias:
            body["logit_bias"] = {str(token): bias for token, bias in self.logit_bias}
        return body

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> TokenOptions:
        """A replica request's options; InvalidParameter (naming the field) otherwise."""
        return cls(
            logprobs=get_int(values, "logprobs", TOP_LOGPROBS),
            prompt_logprobs=get_bool(values, "prompt_logprobs", default=False),
            presence_penalty=get_float(values, "presence_penalty", PENALTY) or 0.0,
            frequency_penalty=get_float(values, "frequency_penalty", PENALTY) or 0.0,
            logit_bias=parse_logit_bias(values.get("logit_bias")),
        )


def parse_logit_bias(value: Any) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``logit_bias``: an object from token ids (as strings) to numbers from -100 to 100."""
    if value is None:
        return ()
    if not isinstance(value, dict) or len(value) > MAX_LOGIT_BIAS_ENTRIES:
        raise InvalidParameter(
            f"logit_bias must be an object of at most {MAX_LOGIT_BIAS_ENTRIES} token ids", param="logit_bias"
        )
    biases: dict[int, float] = {}
    for key, bias in value.items():
        token = get_int({"token": key}, "token", TOKEN_ID) if isinstance(key, str) and key.strip().isdigit() else None
        if token is None:
            raise InvalidParameter(f"logit_bias keys must be token ids, got {key!r}", param="logit_bias")
        biases[token] = _bias(bias, key)
    return tuple(sorted(biases.items()))


def _bias(value: Any, key: str) -> float:
    try:
        bias = get_float({"bias": value}, "bias", LOGIT_BIAS)
    except InvalidParameter:
        bias = None
    if bias is None or isinstance(value, str):
        raise InvalidParameter(
            f"logit_bias[{key!r}] must be a number from {LOGIT_BIAS.minimum:g} to {LOGIT_BIAS.maximum:g}",
            param="logit_bias",
        )
    return bias


NO_TOKEN_OPTIONS = TokenOptions()  # none asked for
