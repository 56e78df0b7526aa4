"""The swarm driver with a fake stepper: the tokens due, and rebuilds that replay every token."""

from __future__ import annotations

import pytest

from client.probes import wait_until
from services.inference.driver import MAX_REBUILDS, SwarmDriver, SwarmFailure
from services.inference.sessions import OneOffLease
from tests.unit.fakes import FakePetalsSession, FakeStepper, oracle

PROMPT = [10, 20, 30]


def drive(stepper: FakeStepper, lease: OneOffLease, new_tokens: int = 6, prompt: list[int] = PROMPT) -> list[int]:
    return list(SwarmDriver(stepper, lease, None).tokens(prompt, new_tokens))


def one_off(max_length: int = 16) -> OneOffLease:
    return OneOffLease(FakePetalsSession(max_length), max_length)


def test_without_failures_one_call_generates_the_tokens_due():
    stepper, lease = FakeStepper(), one_off()
    assert drive(stepper, lease) == oracle(PROMPT, 6)
    assert stepper.sent == [PROMPT] and not stepper.opened


def test_a_failure_rebuilds_the_session_and_replays_every_token():
    held = FakePetalsSession(32)
    held.ids = [1, 2]  # what the session held before this request
    lease = OneOffLease(held, 32)
    stepper = FakeStepper({0: 2})  # the first call fails after 2 tokens
    assert drive(stepper, lease) == oracle([1, 2, *PROMPT], 6)  # as if nothing had failed
    first_two = oracle([1, 2, *PROMPT], 2)
    assert stepper.sent == [PROMPT, [1, 2, *PROMPT, *first_two]]
    assert lease.petals is stepper.opened[0] and stepper.opened[0].max_length == 32
    assert wait_until(lambda: held.closed, timeout=5)  # the broken session is closed aside


def test_failures_beyond_the_rebuilds_are_reported_with_their_cause():
    stepper = FakeStepper({call: 0 for call in range(MAX_REBUILDS + 1)})
    with pytest.raises(SwarmFailure, match=r"failed during generation \(RuntimeError\)") as raised:
        drive(stepper, one_off())
    assert isinstance(raised.value.__cause__, RuntimeError) and len(stepper.opened) == MAX_REBUILDS


def test_no_rebuild_while_the_swarm_is_not_ready():
    stepper = FakeStepper({0: 1}, ready=False)
    with pytest.raises(SwarmFailure):
        drive(stepper, one_off())
    assert not stepper.opened


def test_closing_the_tokens_stops_the_model_at_once():
    stepper, lease = FakeStepper(), one_off()
    tokens = SwarmDriver(stepper, lease, None).tokens(PROMPT, 6)
    first_two = [next(tokens), next(tokens)]
    tokens.close()  # e.g. its client went away
    assert first_two == oracle(PROMPT, 2)
    assert lease.petals.ids == PROMPT + first_two and stepper.sent == [PROMPT] and not stepper.opened
