"""Keeps the gateway's view of its replicas fresh: each one's ``/readyz``, every few seconds.

With ``INFERENCE_DISCOVERY``, each poll first resolves the entries again when they are due (off the
event loop: DNS and file reads block), asks each new URL's ``/readyz`` whose replica it is, and
then forgets the replicas that discovery no longer gives (see replicas.py).

With API keys, each poll also looks at the keys in force (``KeyRing`` reloads a rotated key file):
the sessions of a key id removed since the last poll are closed on every replica, so that a
revoked key's sessions end (their owner's requests are refused at once anyway, and another
client's are as unknown as any other client's session). Every worker does it: closing is idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from services.common.api.discovery import Discovery, Rediscovery
from services.common.api.params import SESSION_ID_PATTERN
from services.common.api.replica_request import CLOSE_CLIENT_SESSIONS_PATH
from services.common.chat.model_card import ModelCard
from services.gateway.api_keys import KeyRing
from services.gateway.auth import ClientIdentity
from services.gateway.replicas import Replica, ReplicaSet
from services.gateway.upstream import DiscoveryProbe, ReplicaUnreachable, Upstream

logger = logging.getLogger(__name__)
REDISCOVER_SOONEST_S = 1.0  # a refresh on demand (an unknown replica named) resolves discovery at most this often


class ReplicaPoller:
    """Polls every replica of a ReplicaSet: readiness, load and model card (a task on the worker's loop)."""

    def __init__(
        self,
        replicas: ReplicaSet,
        upstream: Upstream,
        interval_s: float,
        keys: KeyRing | None = None,
        discovery: Discovery | None = None,
    ) -> None:
        self._replicas = replicas
        self._upstream = upstream
        self._interval_s = interval_s
        self._discovery = discovery or Discovery()
        self._rediscovery = Rediscovery(self._discovery.interval_s)
        self._keys = keys if keys else None
        self._key_ids = set(keys.current().ids) if keys else set()
        self._task: asyncio.Task | None = None
        self._refreshing: asyncio.Future | None = None

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
        """Refresh each replica's state from its /readyz (all at once); close removed keys' sessions."""
        await self._poll_replicas()
        await self._close_removed_keys_sessions()

    async def refresh(self) -> None:
        """Poll every replica now (and discover again, at most once a second), once for all the callers
        that ask meanwhile (a replica that just stopped fails many requests at once)."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._poll_replicas(soonest_s=REDISCOVER_SOONEST_S))
        await asyncio.shield(self._refreshing)

    async def find_new(self) -> None:
        """Discover again now, unless discovery is off or ran less than a second ago (a client's
        unknown session id must not make every request a round of polls)."""
        if self._discovery and self._rediscovery.due(REDISCOVER_SOONEST_S):
            await self.refresh()

    async def _poll_replicas(self, soonest_s: float | None = None) -> None:
        if self._discovery and self._rediscovery.due(soonest_s):
            found = await asyncio.to_thread(self._discovery.find)
            self._rediscovery.done()
            self._replicas.discovered(item.url for item in found)
        known = list(self._replicas.replicas.values())
        pending = self._replicas.pending()
        await asyncio.gather(*map(self._poll_one, known), *map(self._identify, pending))
        for replica in self._replicas.forget_gone():
            logger.info("forgot replica %s at %s: discovery no longer gives it", replica.name, replica.url)

    async def _identify(self, url: str) -> None:
        """Ask a discovered URL's /readyz whose replica it is; then it is one of the set."""
        try:
            answer = await self._upstream.request(
                "discovered", url, "GET", "/readyz", read_timeout_s=self._interval_s, metrics=DiscoveryProbe()
            )
            body = json.loads(answer.data)
        except (ReplicaUnreachable, ValueError) as error:
            logger.debug("discovered %s does not answer yet (%s)", url, error)
            return
        name = body.get("replica_id") if isinstance(body, dict) else None
        valid = isinstance(name, str) and SESSION_ID_PATTERN.match(name)
        replica = self._replicas.identified(name, url) if valid else None
        if replica is None:  # not a replica, or a static one's id (its configured URL stays)
            logger.debug("discovered %s answers as %r: not a replica to add", url, name)
            return
        logger.info("discovered replica %s at %s", name, url)
        try:
            update(replica, answer.status, body)
        except (ValueError, TypeError) as error:
            replica.ready, replica.detail = False, f"unreadable ({error})"

    async def _close_removed_keys_sessions(self) -> None:
        if self._keys is None:
            return
        key_ids = set(self._keys.current().ids)
        removed, self._key_ids = self._key_ids - key_ids, key_ids
        replicas = self._replicas.replicas.values()
        for key_id in sorted(removed):
            client = ClientIdentity(key_id, "").name
            await asyncio.gather(*(self._close_sessions(replica, client) for replica in replicas))

    async def _close_sessions(self, replica: Replica, client: str) -> None:
        try:
            answer = await self._upstream.request(
                replica.name, replica.url, "POST", CLOSE_CLIENT_SESSIONS_PATH, fields={"client": client},
                read_timeout_s=self._interval_s,
            )  # fmt: skip
            logger.info("closed the sessions of removed %s on %s: %s", client, replica.name, answer.data[:100])
        except ReplicaUnreachable as error:
            logger.warning("could not close the sessions of removed %s on %s (%s)", client, replica.name, error)

    async def _poll_one(self, replica: Replica) -> None:
        url = replica.url
        try:
            answer = await self._upstream.request(replica.name, url, "GET", "/readyz", read_timeout_s=self._interval_s)
            if replica.url == url:  # else it moved meanwhile: its new URL's answer counts
                update(replica, answer.status, json.loads(answer.data))
        except (ReplicaUnreachable, ValueError, TypeError) as error:
            if replica.url == url:
                replica.ready, replica.answering, replica.stopping = False, False, False
                replica.detail = f"unreachable or unreadable ({error})"

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
    replica.stopping = body.get("stopping") is True
    replica.adopted = frozenset(str(key) for key in body.get("adopted_sessions") or ())
    identified = body.get("replica_id") == replica.name
    if not identified:
        replica.detail = f"answers as {body.get('replica_id')!r}, configured as {replica.name!r}"
    replica.ready = status == 200 and identified and replica.card is not None
    replica.answering = identified
