"""Generated tokens into the text a client is shown, and the decision to stop at a stop sequence.

Pure bookkeeping over ``decoding.py`` (whole characters only) and ``stopping.py`` (stop sequences
held back and cut): no model, no threads, no metrics.
"""

from __future__ import annotations

from collections.abc import Sequence

from services.inference.decoding import IncrementalDecoder
from services.inference.stopping import StopMatcher


class TokenText:
    """The text of one request's generated tokens, piece by piece as they come."""

    def __init__(self, decoder: IncrementalDecoder, stop_sequences: Sequence[str]) -> None:
        self._decoder = decoder
        self._stops = StopMatcher(stop_sequences)
        self._pieces: list[str] = []
        self.token_ids: list[int] = []

    @property
    def count(self) -> int:
        """Tokens generated so far."""
        return len(self.token_ids)

    @property
    def stopped(self) -> bool:
        """Whether a stop sequence has appeared (generation should end)."""
        return self._stops.matched is not None

    @property
    def stop_sequence(self) -> str | None:
        """The stop sequence that ended the text, if one did."""
        return self._stops.matched

    @property
    def text(self) -> str:
        """Everything released so far."""
        return "".join(self._pieces)

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text it releases (may be empty)."""
        self.token_ids.append(token_id)
        return self._release(self._stops.feed(self._decoder.push(token_id)))

    def finish(self, *, flush: bool) -> str:
        """Release what was held back; ``flush`` also releases an incomplete last character (as
        U+FFFD), when no later request continues the tokens."""
        piece = self._stops.feed(self._decoder.flush()) if flush else ""
        return self._release(piece + self._stops.finish())

    def finish_reason(self, *, new_tokens: int) -> str:
        """``stop`` (a stop sequence), ``length`` (all ``new_tokens``) or ``eos``."""
        if self.stopped:
            return "stop"
        return "length" if self.count >= new_tokens else "eos"

    def _release(self, piece: str) -> str:
        self._pieces.append(piece)
        return piece
