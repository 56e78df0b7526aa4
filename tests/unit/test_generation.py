"""A generation end to end with a fake model and the real session store: events, results, failures."""

from __future__ import annotations

import pytest

from services.common.api.params import GenerateParams
from services.common.web.errors import SessionBusy, SessionNotFound
from services.inference.decoding import IncrementalDecoder
from services.inference.driver import MAX_REBUILDS, SwarmFailure
from services.inference.generation import Generation, GenerationResult, TokenEvent
from services.inference.resources import SseBody
from services.inference.sessions import OneOffLease, SessionStore
from tests.unit.fakes import TOKEN_BYTES, FakePetalsSession, FakeStepper, oracle

PROMPT = [ord(char) for char in "Hi"]
ALWAYS_FAILING = {call: 0 for call in range(MAX_REBUILDS + 1)}


def params(stop: tuple[str, ...] = ()) -> GenerateParams:
    return GenerateParams(None, False, None, None, None, None, 4, None, stop=stop)


def generation(stepper: FakeStepper, lease, new_tokens: int = 4, stop: tuple[str, ...] = ()) -> Generation:
    return Generation(stepper, lease, params(stop), PROMPT, new_tokens, IncrementalDecoder(TOKEN_BYTES))


@pytest.fixture
def store() -> SessionStore:
    return SessionStore(FakePetalsSession, replica_id="inference-0", ttl_s=60, max_sessions=4)


def expected_text(new_tokens: int) -> str:
    return "".join(map(chr, oracle(PROMPT, new_tokens)))


def test_a_stream_yields_each_token_then_the_result_and_closes_a_one_off_session():
    lease = OneOffLease(FakePetalsSession(8), 8)
    events = list(generation(FakeStepper({0: 1}), lease).stream())  # one rebuild on the way
    tokens, result = events[:-1], events[-1]
    assert [event.generated_tokens for event in tokens] == [1, 2, 3, 4]
    assert all(isinstance(event, TokenEvent) for event in tokens) and isinstance(result, GenerationResult)
    assert result.text == "".join(event.text for event in tokens) == expected_text(4)
    assert (result.finish_reason, result.prompt_tokens, result.cached_tokens) == ("length", 2, 0)
    assert lease.petals.closed


def test_a_stop_sequence_ends_the_generation_early():
    stop = expected_text(4)[2]
    result = generation(FakeStepper(), OneOffLease(FakePetalsSession(8), 8), stop=(stop,)).run()
    assert (result.text, result.finish_reason, result.stop_sequence) == (expected_text(2), "stop", stop)
    assert result.generated_tokens == 3


def test_a_broken_user_session_is_retired_with_the_expired_answer(store):
    session = store.open(16)
    stepper = FakeStepper(ALWAYS_FAILING)
    with pytest.raises(SessionNotFound, match=r"failed during generation.*expired or does not exist"):
        generation(stepper, store.acquire(session.session_id)).run()
    assert session.close_reason == "failed" and len(store) == 0


def test_a_broken_one_off_generation_reports_the_swarm_failure():
    lease = OneOffLease(FakePetalsSession(8), 8)
    with pytest.raises(SwarmFailure):
        generation(FakeStepper(ALWAYS_FAILING), lease).run()
    assert lease.petals.closed


def test_a_conversation_session_records_its_text_and_stays_open(store):
    session = store.open(16, conversation=True)
    result = generation(FakeStepper(), store.acquire(session.session_id)).run()
    assert session.text == "Hi" + result.text and len(store) == 1
    assert store.acquire_conversation("Hi" + result.text + "!").session_id == session.session_id


def test_a_user_session_keeps_its_tokens_for_the_next_request(store):
    session = store.open(16)
    generation(FakeStepper(), store.acquire(session.session_id), new_tokens=2).run()
    assert len(session.petals.ids) == 4  # the prompt and 2 tokens
    follow_up = generation(FakeStepper(), store.acquire(session.session_id), new_tokens=2)
    assert follow_up.run().cached_tokens == 4


def test_the_result_comes_once_the_session_is_released(store):
    session = store.open(16)
    lease = store.acquire(session.session_id)
    for event in generation(FakeStepper(), lease).stream():
        if isinstance(event, GenerationResult):
            store.acquire(session.session_id).release()  # not busy: its client may go on at once
            return
    raise AssertionError("no result")


def test_closing_a_stream_early_stops_the_model_and_releases_the_session(store):
    session = store.open(16)
    events = generation(FakeStepper(), store.acquire(session.session_id)).stream()
    first = next(events)
    events.close()  # its client went away
    assert first.generated_tokens == 1 and len(session.petals.ids) == len(PROMPT) + 1
    store.acquire(session.session_id).release()


def test_closing_a_generation_whose_stream_never_started_releases_the_session(store):
    session = store.open(16)
    unstarted = generation(FakeStepper(), store.acquire(session.session_id))
    unstarted.stream().close()  # a generator that never ran ignores close: the session stays leased
    with pytest.raises(SessionBusy):
        store.acquire(session.session_id)
    unstarted.close()
    store.acquire(session.session_id).release()
    assert session.petals.ids == []  # nothing was generated


def test_closing_a_finished_generation_again_changes_nothing(store):
    session = store.open(16)
    finished = generation(FakeStepper(), store.acquire(session.session_id))
    finished.run()
    finished.close()  # no second release of the session's lock
    store.acquire(session.session_id).release()


def test_an_sse_body_closed_before_its_first_chunk_closes_a_one_off_petals_session():
    lease = OneOffLease(FakePetalsSession(8), 8)
    SseBody(generation(FakeStepper(), lease)).close()  # as the WSGI server does with a body it never sent
    assert lease.petals.closed


def test_an_sse_body_sends_each_token_then_done_and_releases_the_session(store):
    session = store.open(16)
    body = SseBody(generation(FakeStepper(), store.acquire(session.session_id)))
    chunks = list(body)
    body.close()
    assert [chunk.split(b"\n", 1)[0] for chunk in chunks] == [b"event: token"] * 4 + [b"event: done"]
    store.acquire(session.session_id).release()
