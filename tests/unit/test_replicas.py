"""The gateway's routing policy, on replica states set by hand (no I/O)."""

from __future__ import annotations

import pytest

from services.common.chat.formats import CHATML, HUMAN_AI
from services.common.chat.model_card import GenerationDefaults, ModelCard
from services.common.web.errors import ModelMismatch, ModelNotFound, ServiceUnavailable, SessionNotFound
from services.gateway.poller import update
from services.gateway.replicas import Decision, ReplicaSet

BLOOM = ModelCard("tiny-bloom", "The seed's family.", HUMAN_AI, GenerationDefaults(), 2048)
SMOL = ModelCard("smollm2", "A real chat model.", CHATML, GenerationDefaults(), 2048)


def replica_set(cards: dict[str, ModelCard | None], default: str | None = None) -> ReplicaSet:
    """Ready replicas ``name -> card`` (None: not reported yet, so not ready)."""
    replicas = ReplicaSet({name: f"http://{name}:8000" for name in cards}, default)
    for name, card in cards.items():
        replica = replicas.replicas[name]
        replica.card, replica.ready, replica.max_sessions = card, card is not None, 10
    return replicas


def test_models_are_listed_once_in_replica_order_and_the_first_is_the_default():
    replicas = replica_set({"inference-0": BLOOM, "inference-1": SMOL, "inference-2": BLOOM, "inference-3": None})
    assert replicas.cards() == [BLOOM, SMOL]
    assert replicas.default_model() == "tiny-bloom" and replicas.resolve(None) == BLOOM
    assert replica_set({"inference-0": BLOOM, "inference-1": SMOL}, "smollm2").resolve(None) == SMOL


def test_unknown_models_are_clear_errors():
    replicas = replica_set({"inference-0": BLOOM, "inference-1": SMOL})
    with pytest.raises(ModelNotFound, match="'gpt-4' is not served here; served: tiny-bloom, smollm2"):
        replicas.resolve("gpt-4")
    with pytest.raises(ServiceUnavailable, match="default model 'gone'"):
        replica_set({"inference-0": BLOOM}, "gone").resolve(None)
    with pytest.raises(ServiceUnavailable, match="reported its model yet"):
        replica_set({"inference-0": None}).resolve(None)


def test_new_sessions_go_to_the_least_loaded_replica_of_their_model():
    replicas = replica_set({"inference-0": BLOOM, "inference-1": SMOL, "inference-2": SMOL})
    replicas.replicas["inference-1"].active_sessions = 5
    assert [r.name for r in replicas.least_loaded(Decision.NEW_SESSION, "smollm2")] == ["inference-2", "inference-1"]
    assert [r.name for r in replicas.least_loaded(Decision.NEW_SESSION, "tiny-bloom")] == ["inference-0"]
    replicas.replicas["inference-0"].ready = False
    with pytest.raises(ServiceUnavailable, match="No inference replica of tiny-bloom is ready"):
        replicas.least_loaded(Decision.SESSIONLESS, "tiny-bloom")


def test_ties_rotate_and_conversations_stick():
    replicas = replica_set({"inference-0": SMOL, "inference-1": SMOL})
    assert {replicas.least_loaded(Decision.SESSIONLESS, "smollm2")[0].name for _ in range(4)} == {
        "inference-0",
        "inference-1",
    }
    first = replicas.by_affinity("conversation-key", "smollm2")[0].name
    assert all(replicas.by_affinity("conversation-key", "smollm2")[0].name == first for _ in range(4))
    assert replicas.by_affinity("conversation-key", "smollm2")[0].model == "smollm2"


def test_a_session_stays_on_its_replica_and_its_model():
    replicas = replica_set({"inference-0": BLOOM, "inference-1": SMOL})
    assert replicas.for_session("inference-1.abc").name == "inference-1"
    assert replicas.for_session("inference-1.abc", "smollm2").name == "inference-1"
    with pytest.raises(ModelMismatch, match="belongs to the model 'smollm2', not 'tiny-bloom'"):
        replicas.for_session("inference-1.abc", "tiny-bloom")
    with pytest.raises(ModelNotFound):
        replicas.for_session("inference-1.abc", "gpt-4")
    with pytest.raises(SessionNotFound, match=r"Session inference-9\.abc expired"):
        replicas.for_session("inference-9.abc")


def test_a_poll_answer_updates_readiness_load_and_card():
    replicas = ReplicaSet({"inference-0": "http://x:1"})
    replica = replicas.replicas["inference-0"]
    body = {"replica_id": "inference-0", "active_sessions": 3, "max_sessions": 8, "detail": "ready"}
    update(replica, 200, {**body, "model_card": None})
    assert not replica.ready, "a replica whose model is not known yet takes no requests"
    update(replica, 200, {**body, "model_card": SMOL.to_json()})
    assert replica.ready and replica.card == SMOL and replica.session_load == 3 / 8
    update(replica, 200, {**body, "replica_id": "inference-7", "model_card": SMOL.to_json()})
    assert not replica.ready and "answers as 'inference-7'" in replica.detail
    with pytest.raises(ValueError):
        update(replica, 200, {**body, "model_card": {"name": 5}})


def test_a_replica_that_says_it_is_stopping_gets_no_new_work_and_keeps_its_sessions():
    replicas = replica_set({"inference-0": SMOL, "inference-1": SMOL})
    replicas.replicas["inference-1"].active_sessions = 9  # the emptier one would be chosen first
    readyz = {"replica_id": "inference-0", "model_card": SMOL.to_json(), "stopping": True, "max_sessions": 10}
    update(replicas.replicas["inference-0"], 503, readyz)
    for decision in (Decision.NEW_SESSION, Decision.SESSIONLESS):
        assert [r.name for r in replicas.least_loaded(decision, "smollm2")] == ["inference-1"]
    assert replicas.for_session("inference-0.abc").name == "inference-0"  # its sessions still reach it (to move)
