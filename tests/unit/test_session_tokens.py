"""The adapter over a Petals session's ``output_ids``: counts, ids, snapshots, restore and replace."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from services.inference.session_tokens import SessionTokens, TokenPrefix


def petals_session(ids: list[int] | None) -> SimpleNamespace:
    """Just the attribute Petals keeps the tokens in: a ``[1, n]`` tensor, or None."""
    return SimpleNamespace(output_ids=None if ids is None else torch.tensor([ids], dtype=torch.long))


def test_a_new_session_holds_nothing():
    for empty in (petals_session(None), petals_session([])):
        tokens = SessionTokens(empty)
        assert tokens.count() == 0 and tokens.ids() == [] and len(tokens.snapshot()) == 0


def test_a_snapshot_stays_what_the_session_held_when_it_was_taken():
    session = petals_session([5, 6, 7])
    tokens = SessionTokens(session)
    prefix = tokens.snapshot()
    tokens.restore(prefix, [8, 9], "cpu")
    assert tokens.ids() == [5, 6, 7, 8, 9] and tokens.count() == 5
    assert prefix.ids() == [5, 6, 7] and prefix.last() == 7


def test_restoring_an_empty_prefix_holds_just_the_added_tokens():
    tokens = SessionTokens(petals_session(None))
    tokens.restore(tokens.snapshot(), [], "cpu")
    assert tokens.count() == 0
    tokens.restore(tokens.snapshot(), [3, 4], "cpu")
    assert tokens.ids() == [3, 4]


def test_followed_by_is_the_sequence_logits_processors_read():
    sequence = TokenPrefix(torch.tensor([[1, 2]])).followed_by([3], "cpu")
    assert sequence.dtype == torch.long and sequence.tolist() == [[1, 2, 3]]


def test_replacing_the_last_token_leaves_earlier_snapshots_alone():
    session = petals_session([5, 6, 7])
    tokens = SessionTokens(session)
    before = tokens.snapshot()
    tokens.replace_last(42)
    assert tokens.ids() == [5, 6, 42] and before.ids() == [5, 6, 7]
