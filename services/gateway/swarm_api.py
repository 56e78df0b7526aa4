"""``GET /api/v2/swarm``: the swarm's state per model (services/common/api/swarm_state.py), as the
replicas of each model read it from the DHT in the background.

The gateway asks one replica of the model that answers its polls, the ready ones first: a replica
whose model has a block range without a server is not ready, and that is when its view matters
most. Nothing is read from the DHT here, and each answer is the replica's last summary.
"""

from __future__ import annotations

import asyncio
import json

import falcon.asgi

from services.common.api.params import get_model
from services.common.api.swarm_state import SWARM_PATH, ModelSwarm
from services.common.web.errors import ServiceUnavailable
from services.gateway.relay import Request
from services.gateway.replicas import ReplicaSet
from services.gateway.upstream import ReplicaUnreachable, Upstream

UNKNOWN_REFRESH_S = 5.0  # what an unknown model's entry suggests as the next look
READ_TIMEOUT_S = 5.0  # a replica answers from memory; one that takes longer is skipped


class SwarmResource:
    """``GET /api/v2/swarm``: every served model's swarm (``{"models": [...]}``, the default model
    first); ``?model=<name>``: that model's (404 for a model not served, 503 if none of its replicas
    answers)."""

    def __init__(self, replicas: ReplicaSet, upstream: Upstream) -> None:
        self._replicas = replicas
        self._upstream = upstream

    async def on_get(self, req: Request, resp: falcon.asgi.Response) -> None:
        model = get_model(req.params)
        if model is not None:
            name = self._replicas.resolve(model).name
            swarm = await self.swarm_of(name)
            if swarm is None:
                raise ServiceUnavailable(f"No inference replica of {name} answers now; retry in a few seconds")
            resp.media = swarm.to_json()
            return
        default = self._replicas.default_model()
        names = sorted((card.name for card in self._replicas.cards()), key=lambda name: name != default)
        swarms = await asyncio.gather(*(self.swarm_of(name) for name in names))
        unknown = ModelSwarm.unknown
        entries = [swarm or unknown(name, 0, UNKNOWN_REFRESH_S) for name, swarm in zip(names, swarms, strict=True)]
        resp.media = {"models": [entry.to_json() for entry in entries]}

    async def swarm_of(self, model: str) -> ModelSwarm | None:
        """The summary of the first replica of ``model`` that answers with one; None if none does."""
        for replica in self._replicas.answering(model):
            try:
                answer = await self._upstream.request(
                    replica.name, replica.url, "GET", SWARM_PATH, read_timeout_s=READ_TIMEOUT_S
                )
                if answer.status == 200:
                    return ModelSwarm.from_json(json.loads(answer.data))
            except (ReplicaUnreachable, ValueError, KeyError, TypeError):
                continue
        return None
