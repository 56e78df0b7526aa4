"""Stop sequences: end a generation when its text contains one, and never show part of one.

Text that could be the beginning of a stop sequence is held back until the next piece shows
whether it is one; the stop sequence itself is never returned.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    """Feeds generated text pieces; releases the text that is safe to show."""

    def __init__(self, stop_sequences: Sequence[str]) -> None:
        self._stops = tuple(s for s in stop_sequences if s)
        self._held = ""
        self.matched: str | None = None

    def feed(self, piece: str) -> str:
        """Add a piece; return what can be shown now. Sets ``matched`` when a stop appears."""
        if self.matched is not None:
            return ""
        text = self._held + piece
        hits = [(text.find(stop), stop) for stop in self._stops if stop in text]
        if hits:
            index, self.matched = min(hits)
            self._held = ""
            return text[:index]
        keep = self._longest_stop_prefix_suffix(text)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def finish(self) -> str:
        """The held-back text, released at the end of a generation that did not stop."""
        held, self._held = self._held, ""
        return "" if self.matched is not None else held

    def _longest_stop_prefix_suffix(self, text: str) -> int:
        """Length of the longest end of ``text`` that begins some stop sequence."""
        longest = 0
        for stop in self._stops:
            for length in range(min(len(stop) - 1, len(text)), longest, -1):
                if stop.startswith(text[-length:]):
                    longest = length
                    break
        return longest
