"""The one request the gateway sends an inference replica to generate, and its JSON form.

The gateway's relays (v1, v2 and the OpenAI-compatible API) build a ``ReplicaRequest`` from what
they validated, and the replica parses it back once, with the same validation. Its JSON is the
v1 ``generate`` parameters (so a v1 call sent straight to a replica is one too) plus:

- ``model``: the model the gateway routed the request for; a replica serving another refuses it;
- ``conversation``: continue the conversation session whose text ``inputs`` extends, or start one
  (the OpenAI chat API; see services/inference/planner.py);
- ``fill_context``: generate as many tokens as the context allows (up to the replica's
  ``MAX_NEW_TOKENS_LIMIT``), instead of ``max_new_tokens`` or ``max_length``;
- ``stop_token`` and ``replace_last_token`` (the WebSocket API's ``extra_stop_sequences``, see
  services/gateway/websocket.py): text that must be exactly one token of the model (else the
  request is refused); with ``replace_last_token`` the session's last token is replaced by that
  one before this request's inputs, so the session goes on as if it had generated it;
- ``logprobs``, ``prompt_logprobs``, ``presence_penalty``, ``frequency_penalty``, ``logit_bias``:
  the OpenAI API's per-token options (services/common/api/token_options.py);
- ``affinity``: a conversation request's routing key (the gateway's hash of its opening messages):
  the conversation session keeps it, so that a replica handing it over picks the replica the
  gateway will send the next turn to (services/common/api/handover.py);
- ``client``: who the gateway serves this request for (``key:<id>`` or ``ip:<address>``): the owner
  of a session the request opens (and whose quota it counts toward), the only client whose session
  (by id, or by conversation) the request may continue (services/inference/sessions.py).
  ``open_inference_session`` and ``close_inference_session`` carry it as a parameter too
  (``get_client``), as does ``CLOSE_CLIENT_SESSIONS_PATH`` (the gateway closes a removed key's sessions).

Every call the gateway makes for a client's request, this one or another, also carries the request's
id in the ``X-Request-Id`` header (services/common/web/request_id.py): for the logs only, never in a body.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from services.common.api.params import MAX_STOP_CHARS, GenerateParams, Limits, get_bool, get_str, parse_generate
from services.common.api.token_options import NO_TOKEN_OPTIONS, TokenOptions
from services.common.web.errors import InvalidParameter

# The replica's paths the gateway calls (the public v1 / v2 paths are the same).
GENERATE_PATH = "/api/v1/generate"
GENERATE_STREAM_PATH = "/api/v2/generate_stream"
OPEN_SESSION_PATH = "/api/v1/open_inference_session"
CLOSE_SESSION_PATH = "/api/v1/close_inference_session"
CLOSE_CLIENT_SESSIONS_PATH = "/internal/close_client_sessions"
TOKENIZE_PATH = "/internal/tokenize"  # the tokenizer endpoints (services/inference/tokenizer_api.py)
DETOKENIZE_PATH = "/internal/detokenize"
CLIENT_PATTERN = re.compile(r"^(key|ip):[A-Za-z0-9_.:%-]{1,64}$")
AFFINITY_PATTERN = re.compile(r"^[0-9a-f]{64}$")


def get_client(values: dict[str, Any]) -> str | None:
    """The ``client`` the gateway names (``key:<id>`` or ``ip:<address>``), or None."""
    client = values.get("client")
    if client is None or client == "":
        return None
    if not isinstance(client, str) or not CLIENT_PATTERN.match(client):
        raise InvalidParameter("client must be key:<id> or ip:<address>")
    return client


def get_affinity(values: dict[str, Any]) -> str | None:
    """A conversation's routing key (64 hex digits), or None."""
    affinity = values.get("affinity")
    if affinity is None or affinity == "":
        return None
    if not isinstance(affinity, str) or not AFFINITY_PATTERN.match(affinity):
        raise InvalidParameter("affinity must be 64 hex digits")
    return affinity


@dataclass(frozen=True)
class ReplicaRequest:
    """A validated generation request, as a replica receives it."""

    params: GenerateParams
    conversation: bool = False
    fill_context: bool = False
    stop_token: str | None = None  # must be exactly one token (validated by the replica)
    replace_last_token: str | None = None  # one token that replaces the session's last one first
    client: str | None = None  # whose quota a session opened for this request counts toward
    options: TokenOptions = NO_TOKEN_OPTIONS  # the OpenAI API's scores, penalties and bias
    affinity: str | None = None  # a conversation's routing key (64 hex digits)

    @property
    def model(self) -> str | None:
        """The model the request is for (None: whichever the replica serves)."""
        return self.params.model

    def to_json(self) -> dict[str, Any]:
        """The JSON body sent to a replica."""
        body = {name: value for name, value in dataclasses.asdict(self.params).items() if value is not None}
        body["stop"] = list(self.params.stop)
        names = ("stop_token", "replace_last_token", "client", "affinity")
        tokens = {name: getattr(self, name) for name in names if getattr(self, name)}
        flags = {"conversation": self.conversation, "fill_context": self.fill_context}
        return {**body, **flags, **tokens, **self.options.to_json()}

    @classmethod
    def from_json(cls, values: dict[str, Any], limits: Limits) -> ReplicaRequest:
        """Validate a replica's request body (query, form or JSON values); InvalidParameter otherwise."""
        fill_context = get_bool(values, "fill_context", default=False)
        request = cls(
            params=parse_generate(values, limits, fill_context=fill_context, internal=True),
            conversation=get_bool(values, "conversation", default=False),
            fill_context=fill_context,
            stop_token=get_str(values, "stop_token", max_chars=MAX_STOP_CHARS) or None,
            replace_last_token=get_str(values, "replace_last_token", max_chars=MAX_STOP_CHARS) or None,
            client=get_client(values),
            options=TokenOptions.from_json(values),
            affinity=get_affinity(values),
        )
        if request.replace_last_token is not None and request.params.session_id is None:
            raise InvalidParameter("replace_last_token needs a session_id")
        return request
