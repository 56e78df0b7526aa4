"""Which sessions a grouped channel waits for (services/inference/step_gathering.py): those just answered
before, until they step, end or their time is up; a session that was late is not waited for again
until it comes back in time."""

from __future__ import annotations

from services.inference.step_gathering import StepGathering


def test_nothing_expected_sends_at_once():
    assert StepGathering(limit_s=0.25).wait_until(10.0) is None


def test_expected_sessions_are_waited_for_until_each_has_stepped():
    gathering = StepGathering(limit_s=0.25)
    gathering.expect(1, 10.0)
    gathering.expect(2, 10.0)
    gathering.arrived(1, 10.01)
    assert gathering.wait_until(10.01) == 10.25
    gathering.arrived(2, 10.02)
    assert gathering.wait_until(10.02) is None


def test_a_session_whose_generation_ended_is_not_waited_for():
    gathering = StepGathering(limit_s=0.25)
    gathering.expect(1, 10.0)
    gathering.forget(1)
    assert gathering.wait_until(10.0) is None


def test_a_session_late_once_is_not_waited_for_until_it_comes_back_in_time():
    gathering = StepGathering(limit_s=0.25)
    gathering.expect(1, 10.0)
    assert gathering.wait_until(10.3) is None  # its time is up: slow
    gathering.arrived(1, 10.4)
    gathering.expect(1, 11.0)
    assert gathering.wait_until(11.0) is None  # slow: not waited for
    gathering.arrived(1, 11.1)  # back within the limit
    gathering.expect(1, 12.0)
    assert gathering.wait_until(12.0) == 12.25


def test_a_session_that_comes_back_later_than_the_limit_becomes_slow():
    gathering = StepGathering(limit_s=0.25)
    gathering.expect(1, 10.0)
    gathering.arrived(1, 10.5)  # nobody was waiting then
    gathering.expect(1, 11.0)
    assert gathering.wait_until(11.0) is None
