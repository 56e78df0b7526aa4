"""The grouped inference stream: many sessions' steps through one server span in one request.

Petals 2.2 sends one request per session, per step, per server (``rpc_inference``, one stream per
session). A replica serving 16 chats through two servers thus makes 32 requests for every token
step, and each costs about 5 ms of CPU on the server outside the blocks' compute. Our servers (with
SWARM_BATCHING on) also answer ``rpc_inference_group``: one stream per client and server span that
carries the steps of all of that client's sessions on the span at once. The server keeps each
session's attention cache under the key its client gave it, runs the one-token steps of a request
as one batched pass and answers with every step's outputs in one response. Stock clients keep
using ``rpc_inference``; this stream is an addition, not a change, to Petals' protocol.

This module is the shape both sides share (``GroupRequest``, ``GroupResponse``); the server side is
services/swarm/grouped_inference.py, the client side services/inference/grouped_sessions.py.

A request (an ``ExpertRequest``): ``uid`` the span's block uids; ``metadata`` (MessagePack)
``{"open": [[key, max_length], ...], "close": [key, ...], "steps": [[key, length], ...]}``: sessions
to open (before the steps), to close (first of all) and the steps, in order; ``tensors[0]`` the
steps' hidden states, each step's ``length`` rows one after the other, ``[rows, hidden]`` (absent
when there is no step). An empty request ends the stream. A response: ``tensors[0]`` the outputs
in the same rows, ``metadata`` ``{"failed": [[key, message], ...]}``: the steps that failed (their
rows are zeros); the other steps are done.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

METHOD = "rpc_inference_group"  # the handler's name on TransformerConnectionHandler


@dataclass(frozen=True)
class GroupStep:
    """One session's step: ``length`` new positions (1 when decoding)."""

    key: int
    length: int


@dataclass(frozen=True)
class GroupRequest:
    """What a client sends a server span in one message of the grouped stream."""

    uid: str
    opens: dict[int, int] = field(default_factory=dict)  # key -> max_length
    closes: tuple[int, ...] = ()
    steps: tuple[GroupStep, ...] = ()
    hidden: torch.Tensor | None = None  # [sum of the steps' lengths, hidden]

    def to_message(self, compression: int = 0) -> Any:
        """The ``ExpertRequest`` of this message (``compression``: hivemind's, for the hidden states)."""
        from hivemind import MSGPackSerializer, serialize_torch_tensor
        from hivemind.proto import runtime_pb2

        metadata = {
            "open": [[key, length] for key, length in self.opens.items()],
            "close": list(self.closes),
            "steps": [[step.key, step.length] for step in self.steps],
        }
        tensors = [] if self.hidden is None else [serialize_torch_tensor(self.hidden, compression)]
        return runtime_pb2.ExpertRequest(uid=self.uid, tensors=tensors, metadata=MSGPackSerializer.dumps(metadata))

    @classmethod
    def from_message(cls, message: Any) -> GroupRequest:
        """The request a message carries; ValueError if it is malformed."""
        from hivemind import MSGPackSerializer, deserialize_torch_tensor

        try:
            metadata = MSGPackSerializer.loads(message.metadata) if message.metadata else {}
            opens = {int(key): int(length) for key, length in metadata.get("open", [])}
            closes = tuple(int(key) for key in metadata.get("close", []))
            steps = tuple(GroupStep(int(key), int(length)) for key, length in metadata.get("steps", []))
        except (TypeError, ValueError, AttributeError) as error:
            raise ValueError(f"malformed grouped inference metadata: {error}") from None
        hidden = deserialize_torch_tensor(message.tensors[0]) if message.tensors else None
        rows = sum(step.length for step in steps)
        if any(step.length < 1 for step in steps) or len({step.key for step in steps}) != len(steps):
            raise ValueError("each step needs at least one position and its own session")
        if rows and (hidden is None or hidden.ndim != 2 or hidden.shape[0] != rows):
            raise ValueError(f"the steps need {rows} rows of hidden states")
        return cls(message.uid, opens, closes, steps, hidden)


@dataclass(frozen=True)
class GroupResponse:
    """What a server answers one request with: every step's output rows, and which steps failed."""

    outputs: torch.Tensor | None  # [rows, hidden], in the request's order; None without steps
    failed: dict[int, str] = field(default_factory=dict)  # key -> why

    def to_message(self, compression: int = 0) -> Any:
        from hivemind import MSGPackSerializer, serialize_torch_tensor
        from hivemind.proto import runtime_pb2

        tensors = [] if self.outputs is None else [serialize_torch_tensor(self.outputs, compression)]
        metadata = MSGPackSerializer.dumps({"failed": [[key, why] for key, why in self.failed.items()]})
        return runtime_pb2.ExpertResponse(tensors=tensors, metadata=metadata)

    @classmethod
    def from_message(cls, message: Any) -> GroupResponse:
        from hivemind import MSGPackSerializer, deserialize_torch_tensor

        metadata = MSGPackSerializer.loads(message.metadata) if message.metadata else {}
        outputs = deserialize_torch_tensor(message.tensors[0]) if message.tensors else None
        return cls(outputs, {int(key): str(why) for key, why in metadata.get("failed", [])})
