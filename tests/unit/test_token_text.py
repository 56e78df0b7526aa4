"""Tokens into text: whole characters only, stop sequences held back and cut, the finish reason."""

from __future__ import annotations

from services.inference.decoding import IncrementalDecoder
from services.inference.token_text import TokenText
from tests.unit.fakes import E_ACUTE, TOKEN_BYTES


def text_of(stop: list[str] | None = None) -> TokenText:
    return TokenText(IncrementalDecoder(TOKEN_BYTES), stop or [])


def ids(text: str) -> list[int]:
    return [ord(char) for char in text]


def test_a_character_over_two_tokens_comes_out_once_complete():
    text = text_of()
    assert [text.push(i) for i in [ord("a"), E_ACUTE[0], E_ACUTE[1]]] == ["a", "", "é"]
    assert text.text == "aé" and text.count == 3 and text.token_ids == [97, *E_ACUTE]


def test_finish_flushes_an_incomplete_character_only_when_asked():
    kept, flushed = text_of(), text_of()
    for text in (kept, flushed):
        text.push(ord("a"))
        text.push(E_ACUTE[0])
    assert kept.finish(flush=False) == "" and kept.text == "a"  # a later request may complete it
    assert flushed.finish(flush=True) == "\ufffd" and flushed.text == "a\ufffd"


def test_a_stop_sequence_is_held_back_cut_and_stops():
    text = text_of(["\n\nHuman:"])
    pieces = [text.push(i) for i in ids("Hi\n\nHuman: more")]
    assert "".join(pieces) == "Hi" and text.stopped and text.stop_sequence == "\n\nHuman:"
    assert text.finish(flush=True) == "" and text.text == "Hi"
    assert text.finish_reason(new_tokens=99) == "stop"


def test_text_that_only_began_a_stop_sequence_is_released_at_the_end():
    text = text_of(["\n\nHuman:"])
    assert "".join(text.push(i) for i in ids("Hi\n\nHu")) == "Hi"
    assert text.finish(flush=False) == "\n\nHu" and not text.stopped


def test_finish_reasons():
    text = text_of()
    for i in ids("abc"):
        text.push(i)
    assert text.finish_reason(new_tokens=3) == "length"
    assert text.finish_reason(new_tokens=4) == "eos"
