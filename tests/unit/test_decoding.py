"""The incremental decoder releases exactly the one-shot decode, whatever the token stream."""

from __future__ import annotations

import random

import pytest
from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

from services.inference.decoding import IncrementalDecoder


def one_shot(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("seed", range(40))
def test_pieces_concatenate_to_one_shot_decode(tokenizer, seed):
    rng = random.Random(seed)
    context = tokenizer("Human: 你好 🌊", add_special_tokens=False).input_ids
    ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 60))]
    decoder = IncrementalDecoder(tokenizer, context)
    pieces = [decoder.push(token_id) for token_id in ids]
    expected = one_shot(tokenizer, ids)
    assert "".join(pieces) == expected.rstrip("\ufffd")  # only a trailing incomplete tail is held back
    assert "".join(pieces) + decoder.flush() == expected


def byte_token(tokenizer, byte: int) -> int:
    """The id of the single-byte token for ``byte`` (byte-level BPE alphabet)."""
    return tokenizer.convert_tokens_to_ids(bytes_to_unicode()[byte])


def test_character_split_over_tokens_is_released_whole(tokenizer):
    wave = "🌊"
    byte_ids = [byte_token(tokenizer, b) for b in wave.encode()]  # four tokens, one byte each
    decoder = IncrementalDecoder(tokenizer)
    assert [decoder.push(i) for i in byte_ids] == ["", "", "", wave]


def test_invalid_bytes_are_not_held_forever(tokenizer):
    lone_continuation = byte_token(tokenizer, 0x80)
    letter = tokenizer.convert_tokens_to_ids("A")
    decoder = IncrementalDecoder(tokenizer)
    assert decoder.push(lone_continuation) == ""
    assert decoder.push(letter) == "\ufffdA"


def test_context_is_never_output(tokenizer):
    context = tokenizer("Hello world", add_special_tokens=False).input_ids
    decoder = IncrementalDecoder(tokenizer, context)
    new = tokenizer(" again", add_special_tokens=False).input_ids
    assert "".join(decoder.push(i) for i in new) == " again"
