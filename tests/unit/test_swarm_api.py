"""``GET /api/v2/swarm`` on the gateway, on replica states set by hand and a fake transport: which
replica it asks (one that answers its polls, ready or not), and what a model none answers for becomes."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from services.common.api.swarm_state import SWARM_PATH, ModelSwarm, summarise
from services.common.chat.formats import CHATML, HUMAN_AI
from services.common.chat.model_card import GenerationDefaults, ModelCard
from services.common.web.errors import ModelNotFound, ServiceUnavailable
from services.gateway.replicas import ReplicaSet
from services.gateway.swarm_api import SwarmResource
from services.gateway.upstream import ReplicaAnswer, ReplicaUnreachable

BLOOM = ModelCard("tiny-bloom", "", HUMAN_AI, GenerationDefaults(), 2048)
SMOL = ModelCard("smollm2", "", CHATML, GenerationDefaults(), 2048)


def swarm_of(model: str) -> ModelSwarm:
    """A model's swarm with no server (broken)."""
    return summarise(model, 2, [], max_servers=10, refresh_seconds=30)


class FakeUpstream:
    """Answers each replica's swarm path from a table: a ModelSwarm, or None for a refused connection."""

    def __init__(self, answers: dict[str, ModelSwarm | None]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    async def request(self, replica: str, url: str, method: str, path: str, **kwargs) -> ReplicaAnswer:
        assert (method, path) == ("GET", SWARM_PATH)
        self.asked.append(replica)
        if self.answers[replica] is None:
            raise ReplicaUnreachable(replica, "connect", "refused")
        return ReplicaAnswer(200, {}, json.dumps(self.answers[replica].to_json()).encode())


def replica_set(states: dict[str, tuple[ModelCard, bool, bool]], default: str | None = None) -> ReplicaSet:
    """Replicas ``name -> (card, ready, answering)``."""
    replicas = ReplicaSet({name: f"http://{name}:8000" for name in states}, default)
    for name, (card, ready, answering) in states.items():
        replica = replicas.replicas[name]
        replica.card, replica.ready, replica.answering = card, ready, answering
    return replicas


def get(resource: SwarmResource, **params: str) -> dict:
    resp = SimpleNamespace(media=None)
    asyncio.run(resource.on_get(SimpleNamespace(params=params), resp))
    return resp.media


def test_an_unready_replica_still_tells_its_swarm_and_a_silent_one_is_skipped():
    """A replica whose swarm lacks a block is unready: that is when its view is asked for."""
    replicas = replica_set({"bloom-0": (BLOOM, False, True), "bloom-1": (BLOOM, False, True),
                            "bloom-2": (BLOOM, False, False)})  # fmt: skip
    upstream = FakeUpstream({"bloom-0": None, "bloom-1": swarm_of("tiny-bloom"), "bloom-2": swarm_of("tiny-bloom")})
    body = get(SwarmResource(replicas, upstream), model="tiny-bloom")
    assert ModelSwarm.from_json(body).model == "tiny-bloom"
    assert upstream.asked == ["bloom-0", "bloom-1"]  # never the replica whose polls fail


def test_ready_replicas_are_asked_first():
    replicas = replica_set({"bloom-0": (BLOOM, False, True), "bloom-1": (BLOOM, True, True)})
    upstream = FakeUpstream({"bloom-0": swarm_of("tiny-bloom"), "bloom-1": swarm_of("tiny-bloom")})
    get(SwarmResource(replicas, upstream), model="tiny-bloom")
    assert upstream.asked == ["bloom-1"]


def test_every_model_is_listed_the_default_first_and_a_silent_one_as_unknown():
    replicas = replica_set({"bloom-0": (BLOOM, True, True), "smol-0": (SMOL, False, True)}, default="smollm2")
    upstream = FakeUpstream({"bloom-0": swarm_of("tiny-bloom"), "smol-0": None})
    models = get(SwarmResource(replicas, upstream))["models"]
    assert [(m["model"], m["state"]) for m in models] == [("smollm2", "unknown"), ("tiny-bloom", "broken")]


def test_unknown_or_silent_models_are_errors():
    replicas = replica_set({"bloom-0": (BLOOM, False, True)})
    resource = SwarmResource(replicas, FakeUpstream({"bloom-0": None}))
    with pytest.raises(ModelNotFound):
        get(resource, model="gpt-4")
    with pytest.raises(ServiceUnavailable, match="No inference replica of tiny-bloom answers"):
        get(resource, model="tiny-bloom")
