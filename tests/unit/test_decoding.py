"""The incremental decoder releases exactly the one-shot decode, whatever the token stream."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

from services.inference.decoding import IncrementalDecoder, TokenBytes, UnsupportedTokenizer

PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def one_shot(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


@pytest.fixture(params=["tiny_bloom", "chatml"])
def any_tokenizer(request, tokenizer, chatml_tokenizer):
    """Both byte-level tokenizers: tiny BLOOM's and the SmolLM2-like one."""
    return tokenizer if request.param == "tiny_bloom" else chatml_tokenizer


def token_streams(size: int):
    """Random ids over the whole vocabulary (special tokens too), now and then the bytes of one
    multi-byte character split over single-byte tokens, as generation produces them."""
    return st.lists(st.one_of(st.integers(0, size - 1), st.sampled_from(["🌊", "你", "é", "€"])), max_size=60)


def ids_of(tokenizer, stream: list) -> list[int]:
    ids: list[int] = []
    for item in stream:
        ids += [byte_token(tokenizer, b) for b in item.encode()] if isinstance(item, str) else [item]
    return ids


@PROPERTY
@given(data=st.data())
def test_pieces_concatenate_to_the_one_shot_decode(any_tokenizer, data):
    ids = ids_of(any_tokenizer, data.draw(token_streams(len(any_tokenizer))))
    decoder = IncrementalDecoder(TokenBytes(any_tokenizer))
    pieces = [decoder.push(token_id) for token_id in ids]
    tail = decoder.flush()
    assert "".join(pieces) + tail == one_shot(any_tokenizer, ids)
    assert tail in ("", "\ufffd")  # only an incomplete character (at most 3 bytes) was held back


def byte_token(tokenizer, byte: int) -> int:
    """The id of the single-byte token for ``byte`` (byte-level BPE alphabet)."""
    return tokenizer.convert_tokens_to_ids(bytes_to_unicode()[byte])


def test_character_split_over_tokens_is_released_whole(tokenizer):
    wave = "🌊"
    decoder = IncrementalDecoder(TokenBytes(tokenizer))
    assert [decoder.push(byte_token(tokenizer, b)) for b in wave.encode()] == ["", "", "", wave]


def test_invalid_bytes_come_out_at_once(tokenizer):
    decoder = IncrementalDecoder(TokenBytes(tokenizer))
    assert decoder.push(byte_token(tokenizer, 0x80)) == "\ufffd"  # a continuation byte with no lead byte
    assert decoder.push(byte_token(tokenizer, 0xF0)) == ""  # may begin a 4-byte character...
    assert decoder.push(tokenizer.convert_tokens_to_ids("A")) == "\ufffdA"  # ...it did not


def test_special_tokens_are_skipped_and_plain_added_tokens_are_text(chatml_tokenizer):
    ids = chatml_tokenizer("<|im_start|>user\nHi<plain added><|im_end|>", add_special_tokens=False).input_ids
    decoder = IncrementalDecoder(TokenBytes(chatml_tokenizer))
    assert "".join(decoder.push(i) for i in ids) == "user\nHi<plain added>"
    assert decoder.push(10**9) == ""  # an id beyond the vocabulary (a padded LM head) decodes to nothing


def test_a_tokenizer_that_is_not_byte_level_is_refused(tokenizer):
    from tokenizers import decoders

    class Metaspace:
        backend_tokenizer = type("Backend", (), {"decoder": decoders.Metaspace()})()

    with pytest.raises(UnsupportedTokenizer, match="byte-level BPE"):
        TokenBytes(Metaspace())
