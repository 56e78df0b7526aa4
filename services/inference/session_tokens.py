"""The tokens a Petals session holds: the one place that reads and writes Petals' ``output_ids``.

Petals keeps a session's tokens in ``InferenceSession.output_ids``: a ``[1, n]`` tensor, or None
before anything was sent; its last token has not gone through the swarm yet (the next step sends
it). Whoever steps a session replaces the tensor, never changes it in place, so a snapshot taken
before a request stays what the session held then. The rest of the service deals in token counts
and lists of token ids.
"""

from __future__ import annotations

from typing import Any


class TokenPrefix:
    """What a session held at one moment: a snapshot, unchanged by later steps."""

    __slots__ = ("_output_ids",)

    def __init__(self, output_ids: Any) -> None:
        self._output_ids = None if output_ids is None or output_ids.shape[1] == 0 else output_ids

    def __len__(self) -> int:
        return 0 if self._output_ids is None else int(self._output_ids.shape[1])

    def ids(self) -> list[int]:
        """The token ids, oldest first."""
        return [] if self._output_ids is None else self._output_ids[0].tolist()

    def last(self) -> int:
        """The last token (never sent through the swarm yet); the prefix must not be empty."""
        return int(self._output_ids[0, -1])

    def followed_by(self, added: list[int], device: Any) -> Any:
        """The ``[1, n]`` tensor of these tokens and then ``added``, on ``device`` (the sequence that
        transformers' logits processors read)."""
        import torch

        tail = torch.tensor([added], dtype=torch.long, device=device)
        return tail if self._output_ids is None else torch.cat([self._output_ids, tail], dim=1)


class SessionTokens:
    """The tokens of one Petals session, read and replaced through typed methods."""

    __slots__ = ("_petals_session",)

    def __init__(self, petals_session: Any) -> None:
        self._petals_session = petals_session

    def count(self) -> int:
        """How many tokens the session holds (prompts and generated tokens)."""
        return len(self.snapshot())

    def ids(self) -> list[int]:
        """The ids of the tokens the session holds, oldest first."""
        return self.snapshot().ids()

    def snapshot(self) -> TokenPrefix:
        """What the session holds now; later steps leave the snapshot as it is."""
        return TokenPrefix(self._petals_session.output_ids)

    def restore(self, prefix: TokenPrefix, added: list[int], device: Any) -> None:
        """Make the session hold ``prefix`` and then ``added`` (what a step left it with)."""
        self._petals_session.output_ids = prefix.followed_by(added, device)

    def replace_last(self, token: int) -> None:
        """Make the session go on as if its last token had been ``token``; it must hold one."""
        replaced = self._petals_session.output_ids.clone()
        replaced[0, -1] = token
        self._petals_session.output_ids = replaced
