"""Incremental detokenization: whole characters out as soon as their bytes are in, nothing held for good.

A byte-level BPE tokenizer (BLOOM's, GPT-2's, SmolLM2's) maps every token to a fixed string of
bytes; one character may spread over several tokens, and one token may end one character and
begin the next. ``TokenBytes`` reads each token's bytes once from the tokenizer's byte-level
alphabet (special tokens have none: they are skipped, as a one-shot decode skips them), and
``IncrementalDecoder`` feeds them to the standard library's incremental UTF-8 decoder: bytes
that can never be a character come out as U+FFFD at once, and only an incomplete sequence (at
most 3 bytes) waits for the next token. So the pieces concatenate to exactly the one-shot
``tokenizer.decode(ids, skip_special_tokens=True)``, and text generated one token per request
in a session concatenates to what one request returns.
"""

from __future__ import annotations

import codecs
from typing import Any

_REPLACE = "replace"  # invalid bytes become U+FFFD, as in the tokenizer's own (lossy) decode


class UnsupportedTokenizer(ValueError):
    """The tokenizer is not byte-level BPE: its tokens have no fixed bytes to decode incrementally."""


def _byte_alphabet() -> dict[str, int]:
    """The byte-level alphabet: the printable stand-in character of each byte (GPT-2's map)."""
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    return {char: byte for byte, char in bytes_to_unicode().items()}


class TokenBytes:
    """The bytes of every token id of a byte-level BPE tokenizer, read once."""

    def __init__(self, tokenizer: Any) -> None:
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        if type(decoder).__name__ != "ByteLevel":
            raise UnsupportedTokenizer(
                "streaming text needs a byte-level BPE tokenizer (BLOOM, GPT-2, Llama 3, SmolLM2 families); "
                f"this one decodes with {type(decoder).__name__}"
            )
        alphabet = _byte_alphabet()
        special = {token_id for token_id, token in tokenizer.added_tokens_decoder.items() if token.special}
        tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        self._bytes = [b"" if i in special or t is None else _token_bytes(t, alphabet) for i, t in enumerate(tokens)]

    def __getitem__(self, token_id: int) -> bytes:
        """A token's bytes; none for a special token or an id the tokenizer does not know."""
        return self._bytes[token_id] if 0 <= token_id < len(self._bytes) else b""


def _token_bytes(token: str, alphabet: dict[str, int]) -> bytes:
    """A token's bytes: its characters mapped back through the alphabet; a token written in plain
    text (an added, non-special token) stands for its own UTF-8, as the tokenizer decodes it."""
    if all(char in alphabet for char in token):
        return bytes(alphabet[char] for char in token)
    return token.encode("utf-8")


class IncrementalDecoder:
    """Turns token ids, one at a time, into text pieces safe to show."""

    def __init__(self, token_bytes: TokenBytes, pending: bytes = b"") -> None:
        self._token_bytes = token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors=_REPLACE)
        self._utf8.decode(pending)  # a handed-over session's incomplete character

    def pending(self) -> bytes:
        """The bytes of an incomplete character waiting for the next token (a handover carries them)."""
        return self._utf8.getstate()[0]

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text it completes (empty while a character is incomplete)."""
        return self._utf8.decode(self._token_bytes[int(token_id)])

    def flush(self) -> str:
        """Release an incomplete tail as U+FFFD (at the end of a one-shot generation)."""
        return self._utf8.decode(b"", final=True)
