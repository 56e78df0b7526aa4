"""The one request the gateway sends an inference replica to generate, and its JSON form.

The gateway's relays (v1, v2 and the OpenAI-compatible API) build a ``ReplicaRequest`` from what
they validated, and the replica parses it back once, with the same validation. Its JSON is the
v1 ``generate`` parameters (so a v1 call sent straight to a replica is one too) plus:

- ``model``: the model the gateway routed the request for; a replica serving another refuses it;
- ``conversation``: continue the conversation session whose text ``inputs`` extends, or start one
  (the OpenAI chat API; see services/inference/generation.py);
- ``fill_context``: generate as many tokens as the context allows (up to the replica's
  ``MAX_NEW_TOKENS_LIMIT``), instead of ``max_new_tokens`` or ``max_length``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from services.common.params import GenerateParams, Limits, get_bool, parse_generate


@dataclass(frozen=True)
class ReplicaRequest:
    """A validated generation request, as a replica receives it."""

    params: GenerateParams
    conversation: bool = False
    fill_context: bool = False

    @property
    def model(self) -> str | None:
        """The model the request is for (None: whichever the replica serves)."""
        return self.params.model

    def to_json(self) -> dict[str, Any]:
        """The JSON body sent to a replica."""
        body = {name: value for name, value in dataclasses.asdict(self.params).items() if value is not None}
        body["stop"] = list(self.params.stop)
        return {**body, "conversation": self.conversation, "fill_context": self.fill_context}

    @classmethod
    def from_json(cls, values: dict[str, Any], limits: Limits) -> ReplicaRequest:
        """Validate a replica's request body (query, form or JSON values); InvalidParameter otherwise."""
        fill_context = get_bool(values, "fill_context", default=False)
        return cls(
            params=parse_generate(values, limits, fill_context=fill_context),
            conversation=get_bool(values, "conversation", default=False),
            fill_context=fill_context,
        )
