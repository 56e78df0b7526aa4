"""A session handed from a stopping replica to another replica of its model: the one typed payload,
its JSON form, and the names both sides and the gateway share.

A replica that stops (SIGTERM: a scale-in, a rolling update, a node drain) sends each of its
sessions to a ready replica of the same model (``ADOPT_SESSION_PATH``, with the deployment's
``HANDOVER_TOKEN`` as a bearer token: no client can reach it through the gateway, and a pod without
the token cannot inject a session or take one). The adopter rebuilds the session on the swarm
from its tokens and keeps its id; it lists the keys (``session_key``: a hash, never the id) of the
sessions it adopted in its ``/readyz``, so every gateway worker routes the old id to it. While the
stopping replica still answers, a request for a session it handed over gets ``SessionMoved``
(services/common/web/errors.py) naming the adopter, which the gateway follows.

Conversation sessions (the OpenAI chat API) carry the gateway's ``affinity`` key, so the stopping
replica sends each to the replica the gateway's rendezvous order picks next (``rendezvous_order``).
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from services.common.api.params import SESSION_ID_PATTERN
from services.common.api.replica_request import get_affinity, get_client
from services.common.web.errors import InvalidParameter

ADOPT_SESSION_PATH = "/internal/adopt_session"
MAX_PENDING_BYTES = 3  # an incomplete UTF-8 character: at most 3 bytes wait for the next token


def session_key(session_id: str) -> str:
    """What a replica publishes of a session it adopted: a hash of the id (the id stays secret)."""
    return hashlib.sha256(session_id.encode()).hexdigest()[:32]


def rendezvous_order(names: Iterable[str], affinity: str) -> list[str]:
    """Replica names, best first, for a conversation's ``affinity`` key: the gateway and the replicas
    rank alike, so a handed-over conversation lands where the gateway sends its next turn."""
    return sorted(names, key=lambda name: hashlib.sha256(f"{name}/{affinity}".encode()).digest(), reverse=True)


@dataclass(frozen=True)
class SessionHandover:
    """Everything a session is, beyond the swarm's attention caches (which the adopter rebuilds)."""

    session_id: str
    model: str
    max_length: int
    token_ids: tuple[int, ...]  # prompts and generated tokens; the last one not yet sent through the swarm
    pending_bytes: bytes  # the decoder's incomplete character (at most 3 bytes)
    idle_s: float  # seconds since its last use: the adopter keeps its TTL running
    client: str | None = None  # its owner (None: a replica called directly)
    conversation: bool = False
    text: str = ""  # a conversation session's text
    affinity: str | None = None  # a conversation's routing key (the gateway's)

    def to_json(self) -> dict[str, Any]:
        """The body of ``ADOPT_SESSION_PATH``."""
        return {
            "session_id": self.session_id,
            "model": self.model,
            "max_length": self.max_length,
            "token_ids": list(self.token_ids),
            "pending_bytes": base64.b64encode(self.pending_bytes).decode(),
            "idle_s": self.idle_s,
            "client": self.client,
            "conversation": self.conversation,
            "text": self.text,
            "affinity": self.affinity,
        }

    @classmethod
    def from_json(cls, values: Any, *, max_length: int, vocabulary: int) -> SessionHandover:
        """Validate an adopt body against this replica's bounds; InvalidParameter otherwise."""
        if not isinstance(values, dict):
            raise InvalidParameter("a handover is a JSON object")
        session_id, model = values.get("session_id"), values.get("model")
        if not isinstance(session_id, str) or not SESSION_ID_PATTERN.match(session_id) or "." not in session_id:
            raise InvalidParameter("session_id must be a session id")
        if not isinstance(model, str):
            raise InvalidParameter("model must be a string")
        length = values.get("max_length")
        if not _is_int(length) or not 1 <= length <= max_length:
            raise InvalidParameter(f"max_length must be 1..{max_length}")
        token_ids = values.get("token_ids")
        if not isinstance(token_ids, list) or not 1 <= len(token_ids) <= length:
            raise InvalidParameter("token_ids must hold 1..max_length token ids")
        if not all(_is_int(token) and 0 <= token < vocabulary for token in token_ids):
            raise InvalidParameter(f"token ids must be 0..{vocabulary - 1}")
        return cls(
            session_id=session_id,
            model=model,
            max_length=length,
            token_ids=tuple(token_ids),
            pending_bytes=_pending_bytes(values.get("pending_bytes")),
            idle_s=_idle(values.get("idle_s")),
            client=get_client(values),
            conversation=values.get("conversation") is True,
            text=_text(values.get("text"), length),
            affinity=get_affinity(values),
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _pending_bytes(value: Any) -> bytes:
    try:
        pending = base64.b64decode(value or "", validate=True)
    except (TypeError, ValueError):
        raise InvalidParameter("pending_bytes must be base64") from None
    if len(pending) > MAX_PENDING_BYTES:
        raise InvalidParameter(f"pending_bytes holds at most {MAX_PENDING_BYTES} bytes")
    return pending


def _idle(value: Any) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value < 86_400:
        raise InvalidParameter("idle_s must be seconds, 0..86400")
    return float(value)


def _text(value: Any, max_length: int) -> str:
    if not isinstance(value, str) or len(value) > 64 * max_length:
        raise InvalidParameter("text must be a string of at most 64 characters per token")
    return value
