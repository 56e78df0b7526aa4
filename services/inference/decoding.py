"""Incremental detokenization that never splits a character.

Byte-level tokenizers (BLOOM's among them) may spread one character over several tokens, and
one token may end one character and begin the next. The decoder keeps a window of recent
tokens, decodes it whole, and releases the text up to any trailing U+FFFD (an incomplete UTF-8
sequence that a later token may still complete). The decoder lives as long as the inference
session, so text generated one token per request concatenates to exactly what one request
returns. Invalid bytes are never held for good: once a later token ends in a complete
character, they are released as U+FFFD, as a one-shot decode shows them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_CONTEXT_TOKENS = 5  # tokens of context before the new ones: keeps leading spaces right
_REPLACEMENT = "\ufffd"


class IncrementalDecoder:
    """Turns token ids, one at a time, into text pieces safe to show."""

    def __init__(self, tokenizer: Any, context_ids: Sequence[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._context_chars = 0
        self._emitted_chars = 0
        self.reset(context_ids)

    def reset(self, context_ids: Sequence[int]) -> None:
        """Start after ``context_ids`` (a prompt): their text is context, never output."""
        self._ids = list(context_ids[-_CONTEXT_TOKENS:])
        self._context_chars = len(self._decode(self._ids))
        self._emitted_chars = 0

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text it completes (maybe empty)."""
        self._ids.append(int(token_id))
        text = self._decode(self._ids)
        stable = text.rstrip(_REPLACEMENT)
        piece = stable[self._context_chars + self._emitted_chars :]
        self._emitted_chars += len(piece)
        if len(stable) == len(text):  # ends on a whole character: restart the window here
            self.reset(self._ids)
        return piece

    def flush(self) -> str:
        """Release whatever is held back (at the end of a one-shot generation)."""
        piece = self._decode(self._ids)[self._context_chars + self._emitted_chars :]
        self.reset(self._ids)
        return piece

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
