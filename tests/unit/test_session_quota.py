"""The per-client session quota of the session store, with a fake Petals session and a fake clock."""

from __future__ import annotations

import pytest

from services.common.web.errors import SessionNotFound, SessionQuotaExceeded
from services.inference.sessions import SessionStore
from tests.unit.fakes import Clock, FakePetalsSession


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(clock) -> SessionStore:
    return SessionStore(FakePetalsSession, replica_id="inference-0", ttl_s=100, max_sessions=10,
                        max_sessions_per_client=2, clock=clock)  # fmt: skip


def open_at(store: SessionStore, clock: Clock, now: float, client: str | None):
    clock.now = now
    return store.open(16, client=client)


def test_a_client_at_its_quota_gets_room_from_its_oldest_idle_session(store, clock):
    oldest = open_at(store, clock, 1, "ip:10.0.0.1")
    newer = open_at(store, clock, 2, "ip:10.0.0.1")
    clock.now = 3
    with store.acquire(oldest.session_id, "ip:10.0.0.1"):  # used last: now newer is the least recently used
        pass
    third = open_at(store, clock, 4, "ip:10.0.0.1")
    assert newer.petals is None  # closed on the swarm
    with pytest.raises(SessionNotFound, match=f"Session {newer.session_id} expired"):
        store.acquire(newer.session_id, "ip:10.0.0.1")
    for kept in (oldest, third):
        with store.acquire(kept.session_id, "ip:10.0.0.1"):
            pass
    assert len(store) == 2


def test_busy_sessions_are_never_taken_and_all_busy_is_429(store, clock):
    first = open_at(store, clock, 1, "key:alice")
    second = open_at(store, clock, 2, "key:alice")
    with store.acquire(first.session_id, "key:alice"):
        third = open_at(store, clock, 3, "key:alice")  # the idle one (second) makes room
        assert second.petals is None and first.petals is not None
        with (
            store.acquire(third.session_id, "key:alice"),
            pytest.raises(SessionQuotaExceeded, match="quota of 2 sessions, all busy"),
        ):
            store.open(16, client="key:alice")
    assert SessionQuotaExceeded.http_status.startswith("429")


def test_clients_are_counted_apart_and_unnamed_ones_not_at_all(store, clock):
    mine = [open_at(store, clock, t, "key:alice") for t in (1, 2)]
    theirs = [open_at(store, clock, t, "key:bob") for t in (3, 4)]
    unnamed = [open_at(store, clock, t, None) for t in (5, 6, 7)]
    assert all(session.petals is not None for session in mine + theirs + unnamed)
    open_at(store, clock, 8, "key:bob")
    assert theirs[0].petals is None and all(session.petals is not None for session in mine)


def test_conversation_sessions_count_toward_the_quota(store, clock):
    chat = store.open(16, conversation=True, client="ip:10.0.0.2")
    open_at(store, clock, 1, "ip:10.0.0.2")
    open_at(store, clock, 2, "ip:10.0.0.2")
    assert chat.petals is None


def test_no_quota_by_default(clock):
    store = SessionStore(FakePetalsSession, replica_id="r", ttl_s=100, max_sessions=10, clock=clock)
    sessions = [store.open(16, client="ip:10.0.0.3") for _ in range(5)]
    assert all(session.petals is not None for session in sessions)
