"""Keeps the gateway's view of its replicas fresh: each one's ``/readyz``, every few seconds."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from services.common.model_card import ModelCard
from services.gateway.replicas import Replica, ReplicaSet
from services.gateway.upstream import ReplicaUnreachable, Upstream

logger = logging.getLogger(__name__)


class ReplicaPoller:
    """Polls every replica of a ReplicaSet: readiness, load and model card (a task on the worker's loop)."""

    def __init__(self, replicas: ReplicaSet, upstream: Upstream, interval_s: float) -> None:
        self._replicas = replicas
        self._upstream = upstream
        self._interval_s = interval_s
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        """Poll every replica now, then in the background."""
        await self.poll()
        self._task = asyncio.create_task(self._poll_forever(), name="replica-poller")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def poll(self) -> None:
        """Refresh each replica's state from its /readyz (all at once)."""
        await asyncio.gather(*(self._poll_one(replica) for replica in self._replicas.replicas.values()))

    async def _poll_one(self, replica: Replica) -> None:
        try:
            answer = await self._upstream.request(
                replica.name, replica.url, "GET", "/readyz", read_timeout_s=self._interval_s
            )
            update(replica, answer.status, json.loads(answer.data))
        except (ReplicaUnreachable, ValueError, TypeError) as error:
            replica.ready, replica.detail = False, f"unreachable or unreadable ({error})"

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.poll()
            except Exception:
                logger.exception("polling replicas failed")


def update(replica: Replica, status: int, body: dict) -> None:
    """A replica's state from its /readyz answer; ValueError if the answer is malformed."""
    card = body.get("model_card")
    replica.card = ModelCard.from_json(card) if card is not None else replica.card
    replica.active_sessions = int(body.get("active_sessions", 0))
    replica.max_sessions = int(body.get("max_sessions", 1))
    replica.detail = str(body.get("detail", ""))
    identified = body.get("replica_id") == replica.name
    if not identified:
        replica.detail = f"answers as {body.get('replica_id')!r}, configured as {replica.name!r}"
    replica.ready = status == 200 and identified and replica.card is not None
