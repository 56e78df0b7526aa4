"""Stop sequences end the text before them and are never shown, even split over pieces."""

from __future__ import annotations

import pytest

from services.inference.stopping import StopMatcher


def feed_all(stops, pieces):
    matcher = StopMatcher(stops)
    shown = [matcher.feed(piece) for piece in pieces]
    return shown, matcher.finish(), matcher.matched


def test_stop_split_over_pieces_is_never_shown():
    shown, rest, matched = feed_all(["\n\nHuman:"], ["Hello", " there", "\n", "\nHu", "man:", " more"])
    assert "".join(shown) + rest == "Hello there"
    assert matched == "\n\nHuman:"
    assert shown[2] == ""  # the newline was held back: it might start the stop sequence


def test_held_text_is_released_when_it_turns_out_not_to_be_a_stop():
    shown, rest, matched = feed_all(["\n\nHuman:"], ["a\n", "\nHe", "llo"])
    assert "".join(shown) + rest == "a\n\nHello" and matched is None


def test_without_stop_sequences_everything_passes_through():
    shown, rest, matched = feed_all([], ["a", "b\n"])
    assert shown == ["a", "b\n"] and rest == "" and matched is None


@pytest.mark.parametrize("stops", [["END", "STOP"], ["STOP", "END"]])
def test_earliest_stop_wins(stops):
    shown, _, matched = feed_all(stops, ["xx STOP yy END"])
    assert "".join(shown) == "xx " and matched == "STOP"
