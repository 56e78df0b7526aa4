"""Incremental detokenization that never splits a character.

Byte-level tokenizers (BLOOM's among them) may emit one character over several tokens. The
decoder re-decodes a short window of recent tokens and only releases text once it no longer
ends in U+FFFD (an incomplete UTF-8 sequence); what it holds back stays in the decoder, which
lives as long as the inference session, so text generated one token per request concatenates
to exactly what one request would have returned. Invalid bytes are not held forever: as soon
as a later token completes a character, the whole window is released (with U+FFFD in place of
the invalid bytes, as a one-shot decode shows them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_CONTEXT_TOKENS = 5  # tokens of context before the new ones: keeps leading spaces right


class IncrementalDecoder:
    """Turns token ids, one at a time, into text pieces safe to show."""

    def __init__(self, tokenizer: Any, context_ids: Sequence[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self.reset(context_ids)

    def reset(self, context_ids: Sequence[int]) -> None:
        """Start after ``context_ids`` (a prompt): its text is context, never output."""
        self._ids = list(context_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text it completes (maybe empty)."""
        self._ids.append(int(token_id))
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        self._ids = self._ids[self._read_offset :]
        self._prefix_offset, self._read_offset = 0, len(self._ids)
        return new_text[len(prefix_text) :]

    def flush(self) -> str:
        """Release whatever is held back (at the end of a one-shot generation)."""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        self.reset(self._ids)
        return new_text[len(prefix_text) :]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
