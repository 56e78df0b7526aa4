"""The session store's rules, with a fake Petals session and a fake clock."""

from __future__ import annotations

import pytest

from services.common.web.errors import SessionBusy, SessionNotFound, TooManySessions
from services.inference.sessions import OneOffLease, SessionStore
from tests.unit.fakes import Clock, FakePetalsSession


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(clock) -> SessionStore:
    return SessionStore(FakePetalsSession, replica_id="inference-3", ttl_s=10, max_sessions=2, clock=clock)


def test_ids_name_the_replica(store):
    assert store.open(16).session_id.startswith("inference-3.")


def test_limit_refuses_the_extra_session_and_keeps_the_others(store):
    first, second = store.open(16), store.open(16)
    with pytest.raises(TooManySessions, match="maximum of 2 sessions"):
        store.open(16)
    with store.acquire(first.session_id), store.acquire(second.session_id):
        pass


def test_concurrent_lease_is_refused(store):
    session = store.open(16)
    with store.acquire(session.session_id), pytest.raises(SessionBusy), store.acquire(session.session_id):
        pass


def test_expiry_is_refreshed_by_use_and_reaped(store, clock):
    used, idle = store.open(16), store.open(16)
    clock.now = 8
    with store.acquire(used.session_id):
        pass
    clock.now = 12
    assert store.reap_expired() == 1
    assert idle.petals is None  # closed
    with store.acquire(used.session_id):
        pass
    clock.now = 30
    with pytest.raises(SessionNotFound, match="expired or does not exist"), store.acquire(used.session_id):
        pass


def test_close_while_in_use_waits_for_the_request(store):
    session = store.open(16)
    petals = session.petals
    with store.acquire(session.session_id):
        store.close(session.session_id)
        assert not petals.closed  # the running request keeps it
    assert petals.closed


def test_close_all(store):
    sessions = [store.open(16), store.open(16)]
    store.close_all()
    assert len(store) == 0 and all(s.petals is None for s in sessions)


def test_a_lease_replaces_the_petals_session_in_place(store):
    session = store.open(16)
    with store.acquire(session.session_id) as lease:
        old = lease.replace_petals(FakePetalsSession(16))
        assert old is not session.petals and lease.petals is session.petals
    assert not old.closed  # the caller closes what it replaced


def test_a_retired_lease_closes_on_release_and_the_session_is_gone(store):
    session = store.open(16)
    petals = session.petals
    lease = store.acquire(session.session_id)
    lease.retire("failed")
    assert not petals.closed and session.close_reason == "failed"
    lease.release()
    assert petals.closed
    with pytest.raises(SessionNotFound):
        store.acquire(session.session_id)


def test_a_lease_records_the_text_a_conversation_is_matched_by(store):
    session = store.open(64, conversation=True)
    with store.acquire(session.session_id) as lease:
        assert lease.conversation and not lease.resumable
        lease.record_text("Human: hi")
    assert store.acquire_conversation("Human: hi\n\nAI:").session_id == session.session_id


def test_a_user_session_lease_is_resumable(store):
    with store.acquire(store.open(16).session_id) as lease:
        assert lease.resumable and not lease.conversation and lease.max_length == 16 and lease.token_count == 0


def test_a_one_off_lease_closes_its_petals_session_on_release():
    lease = OneOffLease(FakePetalsSession(8), 8)
    lease.retire("failed")  # nothing to retire
    assert not lease.petals.closed and not lease.resumable
    first = lease.replace_petals(FakePetalsSession(8))
    lease.release()
    assert lease.petals.closed and not first.closed


def conversation(store: SessionStore, text: str):
    session = store.open(64, conversation=True)
    session.text = text
    return session


def test_conversation_lookup_takes_the_longest_idle_prefix(store):
    conversation(store, "Human: hi")
    longer = conversation(store, "Human: hi\n\nAI: hello")
    found = store.acquire_conversation("Human: hi\n\nAI: hello\n\nHuman: more")
    assert found.session_id == longer.session_id
    # Busy now: the next lookup falls back to the shorter prefix.
    assert store.acquire_conversation("Human: hi\n\nAI: hello\n\nHuman: again").text == "Human: hi"


def test_conversation_lookup_ignores_other_text_and_user_sessions(store):
    store.open(64)  # a user's session, addressed by its id only
    conversation(store, "Human: hi")
    assert store.acquire_conversation("Human: bye") is None


def test_conversation_lookup_skips_expired_sessions(store, clock):
    conversation(store, "Human: hi")
    clock.now = 11
    assert store.acquire_conversation("Human: hi there") is None


def test_new_conversation_evicts_the_least_recent_idle_one(store, clock):
    oldest = conversation(store, "a")
    clock.now = 1
    conversation(store, "b")
    clock.now = 2
    conversation(store, "c")
    assert oldest.petals is None and oldest.close_reason == "evicted"
    assert len(store) == 2


def test_a_user_session_does_not_evict_conversations(store):
    conversation(store, "a")
    conversation(store, "b")
    with pytest.raises(TooManySessions):
        store.open(16)


# ---- ownership -------------------------------------------------------------------------------


def test_another_clients_session_is_as_unknown_as_a_missing_one(store):
    session = store.open(16, client="key:alice")
    unknown = f"Session {session.session_id} expired or does not exist"  # what a missing id gets, word for word
    for client in ("key:bob", "ip:127.0.0.1", None):
        with pytest.raises(SessionNotFound) as using:
            store.acquire(session.session_id, client)
        with pytest.raises(SessionNotFound) as closing:
            store.close(session.session_id, client=client)
        assert str(using.value) == str(closing.value) == unknown
    with store.acquire(session.session_id, "key:alice"):  # untouched: its owner goes on
        pass
    store.close(session.session_id, client="key:alice")
    assert session.petals is None


def test_a_busy_session_of_another_client_is_unknown_not_busy(store):
    session = store.open(16, client="key:alice")
    with store.acquire(session.session_id, "key:alice"), pytest.raises(SessionNotFound):
        store.acquire(session.session_id, "key:bob")


def test_conversations_are_continued_only_by_their_client(store):
    mine = store.open(16, conversation=True, client="key:alice")
    mine.text = "Hello"
    assert store.acquire_conversation("Hello there", "key:bob") is None
    assert store.acquire_conversation("Hello there", None) is None
    with store.acquire_conversation("Hello there", "key:alice") as lease:
        assert lease.session_id == mine.session_id


def test_close_client_closes_only_its_sessions(store):
    revoked, kept = store.open(16, client="key:alice"), store.open(16, client="key:bob")
    assert store.close_client("key:alice") == 1
    assert revoked.petals is None and kept.petals is not None
    with pytest.raises(SessionNotFound):
        store.acquire(revoked.session_id, "key:alice")
    assert store.close_client("key:alice") == 0


def test_requests_without_a_session_are_limited_and_release_their_slot():
    store = SessionStore(FakePetalsSession, replica_id="r", ttl_s=10, max_sessions=2, max_one_off=2)
    first, second = store.open_one_off(8), store.open_one_off(8)
    with pytest.raises(TooManySessions, match="maximum of 2 requests without a session") as refused:
        store.open_one_off(8)
    assert refused.value.headers["Retry-After"] == "1" and refused.value.error_code == "too_many_sessions"
    first.release()
    first.release()  # a second release frees no second slot
    assert first.petals.closed
    third = store.open_one_off(8)
    with pytest.raises(TooManySessions):
        store.open_one_off(8)
    for lease in (second, third):
        lease.release()
