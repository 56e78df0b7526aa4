"""Handing sessions over on a planned stop: the payload, the store's two sides, the gateway's routing
(fakes for the Petals sessions; the integration test runs it for real)."""

from __future__ import annotations

import threading

import pytest

from services.common.api.handover import SessionHandover, rendezvous_order, session_key
from services.common.chat.formats import HUMAN_AI
from services.common.chat.model_card import GenerationDefaults, ModelCard
from services.common.startup.config import ConfigError, Env
from services.common.web.errors import (
    InvalidParameter,
    ServiceUnavailable,
    SessionBusy,
    SessionMoved,
    SessionNotFound,
    TooManySessions,
)
from services.gateway.poller import update
from services.gateway.replicas import ReplicaSet
from services.inference.sessions import SessionStore
from services.inference.settings import InferenceSettings
from tests.unit.fakes import Clock, FakePetalsSession

CARD = ModelCard("tiny-bloom", "", HUMAN_AI, GenerationDefaults(), 2048)
AFFINITY = "ab" * 32


def handover(**fields) -> SessionHandover:
    values = {"session_id": "inference-0.abc", "model": "tiny-bloom", "max_length": 16, "token_ids": [5, 6],
              "pending_bytes": "4oI=", "idle_s": 3, "client": "ip:10.0.0.1", "conversation": True,
              "text": "Hi", "affinity": AFFINITY, **fields}  # fmt: skip
    return SessionHandover.from_json(values, max_length=32, vocabulary=100)


def stores(clock: Clock) -> tuple[SessionStore, SessionStore]:
    def store(name: str) -> SessionStore:
        return SessionStore(FakePetalsSession, replica_id=name, ttl_s=10, max_sessions=3, clock=clock)

    return store("inference-0"), store("inference-1")


def test_the_payload_round_trips_and_refuses_what_is_out_of_bounds():
    payload = handover()
    assert payload.pending_bytes == b"\xe2\x82" and payload.token_ids == (5, 6)
    assert SessionHandover.from_json(payload.to_json(), max_length=32, vocabulary=100) == payload
    for bad, match in (
        ({"token_ids": [100]}, "token ids must be 0..99"),
        ({"token_ids": []}, "1..max_length"),
        ({"max_length": 64}, "max_length must be 1..32"),
        ({"session_id": "no-dot"}, "session id"),
        ({"pending_bytes": "AAAAAAA="}, "at most 3 bytes"),
        ({"client": "someone"}, "client must be"),
        ({"affinity": "x"}, "affinity"),
        ({"idle_s": -1}, "idle_s"),
    ):
        with pytest.raises(InvalidParameter, match=match):
            handover(**bad)


def test_rendezvous_order_is_the_same_for_any_listing():
    names = ["inference-0", "inference-1", "inference-2"]
    assert rendezvous_order(names, AFFINITY) == rendezvous_order(reversed(names), AFFINITY)


def test_a_handed_over_session_keeps_its_id_client_and_state_on_the_adopter():
    clock = Clock()
    old, new = stores(clock)
    session = old.open(16, client="ip:1")
    session.petals.ids = [1, 2, 3]
    sent: list[SessionHandover] = []

    def send(payload: SessionHandover) -> str:
        sent.append(payload)
        new.adopt(payload, FakePetalsSession(payload.max_length), decoder=None)
        return "inference-1"

    petals = session.petals
    clock.now = 4
    assert old.start_handover() == [session]
    assert old.hand_over(session, send, "tiny-bloom") and petals.closed
    assert sent[0].token_ids == (1, 2, 3) and sent[0].idle_s == 4 and sent[0].client == "ip:1"
    with pytest.raises(SessionMoved) as moved:
        old.acquire(session.session_id, "ip:1")
    assert moved.value.headers["X-Petals-Chat-Moved-To"] == "inference-1"
    with pytest.raises(SessionNotFound):  # another client learns nothing
        old.acquire(session.session_id, "ip:2")
    with pytest.raises(SessionNotFound):
        new.acquire(session.session_id, "ip:2")
    with new.acquire(session.session_id, "ip:1"):
        pass
    assert new.adopted_keys() == [session_key(session.session_id)]
    idle = handover(session_id="inference-0.idle", idle_s=8)
    new.adopt(idle, FakePetalsSession(16), None)
    clock.now = 6.5  # its TTL went on running across the move: 10.5 s idle
    assert new.reap_expired() == 1 and len(new) == 1


def test_a_stopping_store_takes_no_session_and_a_failed_handover_is_the_expired_answer():
    old, _ = stores(Clock())
    session = old.open(16)
    old.start_handover()
    with pytest.raises(ServiceUnavailable, match="stopping"):
        old.open(16)
    assert not old.hand_over(session, lambda payload: None, "tiny-bloom")
    assert session.close_reason == "handover_failed" and session.petals is None
    with pytest.raises(SessionNotFound, match="expired or does not exist"):
        old.acquire(session.session_id)


def test_a_request_during_the_move_waits_for_it_then_follows():
    old, new = stores(Clock())
    session = old.open(16)
    session.petals.ids = [7]
    old.start_handover()
    outcome: list[BaseException] = []

    def request() -> None:
        try:
            old.acquire(session.session_id)
        except SessionMoved as error:
            outcome.append(error)

    waiting = threading.Thread(target=request)
    waiting.start()
    assert old.hand_over(session, lambda p: new.adopt(p, FakePetalsSession(16), None) and "inference-1", "m")
    waiting.join(5)
    assert len(outcome) == 1


def test_a_moved_conversation_is_found_by_its_text():
    old, new = stores(Clock())
    lease = old.acquire(old.open(16, conversation=True, affinity=AFFINITY).session_id)
    lease.record_text("Hello")
    lease.release()
    (session,) = old.start_handover()
    assert old.hand_over(session, lambda p: new.adopt(p, FakePetalsSession(16), None) and "inference-1", "m")
    with pytest.raises(SessionMoved):
        old.acquire_conversation("Hello there")
    assert old.acquire_conversation("Bye") is None
    assert new.acquire_conversation("Hello there") is not None
    assert session_key(AFFINITY) in new.adopted_keys()


def test_adoption_is_refused_when_full_stopping_or_already_held():
    clock = Clock()
    _, new = stores(clock)
    payload = handover()
    new.adopt(payload, FakePetalsSession(16), None)
    with pytest.raises(SessionBusy):
        new.adopt(payload, FakePetalsSession(16), None)
    new.open(16), new.open(16)
    with pytest.raises(TooManySessions):
        new.check_adoptable("inference-0.other")
    new.start_handover()
    with pytest.raises(ServiceUnavailable):
        new.check_adoptable("inference-0.other")


def test_the_gateway_routes_an_adopted_session_to_its_adopter():
    replicas = ReplicaSet({"inference-0": "http://a", "inference-1": "http://b"})
    for name, body in (
        ("inference-0", {"replica_id": "inference-0", "stopping": True}),
        ("inference-1", {"replica_id": "inference-1", "adopted_sessions": [session_key("inference-0.abc")]}),
    ):
        update(replicas.replicas[name], 503 if name == "inference-0" else 200, {**body, "model_card": CARD.to_json()})
    assert replicas.for_session("inference-0.abc").name == "inference-1"
    assert replicas.for_session("inference-0.xyz").name == "inference-0"  # not moved: still its own replica's
    assert replicas.moved("inference-0.abc", "inference-1").name == "inference-1"
    assert replicas.moved("inference-0.abc", "inference-9") is None


def test_a_conversation_goes_to_its_adopter_and_a_stopping_claimant_first():
    replicas = ReplicaSet({f"inference-{i}": f"http://{i}" for i in range(3)})
    for replica in replicas.replicas.values():
        replica.card, replica.ready = CARD, True
    ranked = [r.name for r in replicas.by_affinity(AFFINITY, "tiny-bloom")]
    adopter = ranked[-1]
    replicas.replicas[adopter].adopted = frozenset({session_key(AFFINITY)})
    assert [r.name for r in replicas.by_affinity(AFFINITY, "tiny-bloom")] == [adopter, *ranked[:-1]]
    stopping = replicas.replicas[ranked[0]]
    stopping.ready, stopping.stopping, stopping.adopted = False, True, frozenset({session_key(AFFINITY)})
    assert [r.name for r in replicas.by_affinity(AFFINITY, "tiny-bloom")] == [ranked[0], adopter, ranked[1]]


def test_the_handover_settings_are_checked_at_start_up(tmp_path):
    base = {"MODEL": "m", "REPLICA_ID": "inference-1"}
    peers = "inference-0=http://a:8080 inference-1=http://b:8080"
    settings = InferenceSettings.from_env(Env({**base, "HANDOVER_TOKEN": "t" * 16, "INFERENCE_PEERS": peers}))
    assert settings.peers == {"inference-0": "http://a:8080"} and settings.handover_linger_s == 5
    (tmp_path / "token").write_text("f" * 20 + "\n")
    from_file = InferenceSettings.from_env(Env({**base, "HANDOVER_TOKEN_FILE": str(tmp_path / "token")}))
    assert from_file.handover_token == "f" * 20
    for bad, match in (
        ({"HANDOVER_TOKEN": "short"}, "at least 16"),
        ({"HANDOVER_TOKEN": "t" * 16, "HANDOVER_TOKEN_FILE": "x"}, "not both"),
        ({"HANDOVER_TOKEN_FILE": str(tmp_path / "missing")}, "cannot be read"),
        ({"INFERENCE_PEERS": "inference-0"}, "INFERENCE_PEERS entry"),
    ):
        with pytest.raises(ConfigError, match=match):
            InferenceSettings.from_env(Env({**base, **bad}))
