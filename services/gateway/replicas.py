"""The inference replicas a gateway routes to, and how it chooses one.

No shared store: a session's id starts with the id of the replica that holds it
(``inference-1.Xy...``), so any gateway replica, restarted or new, routes it by reading the id.
New sessions go to the ready replica with the fewest open sessions (polled from the replicas'
``/readyz``, and counted up locally as this worker opens sessions, so a burst spreads before the
next poll); session-less requests go to the ready replica with the fewest requests in flight from
this worker. Ties rotate. Chat conversations (the OpenAI-compatible API) go to the replica
that rendezvous hashing picks for the conversation's opening messages, so that a follow-up
finds the session that holds its beginning.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from services.common.errors import ServiceUnavailable, SessionNotFound
from services.gateway.metrics import ROUTING_DECISIONS
from services.gateway.upstream import ReplicaUnreachable, Upstream

logger = logging.getLogger(__name__)


@dataclass
class Replica:
    """One inference replica and what its last poll said."""

    name: str
    url: str
    ready: bool = False
    active_sessions: int = 0
    max_sessions: int = 1
    detail: str = "not polled yet"
    model: str = ""  # the model name the replica serves (from its /readyz)
    in_flight: int = 0  # requests this worker has sent and not yet seen answered

    @property
    def session_load(self) -> float:
        return self.active_sessions / max(self.max_sessions, 1)


class ReplicaSet:
    """Configured replicas, their polled state, and the routing choices."""

    def __init__(self, replicas: dict[str, str], upstream: Upstream, poll_interval_s: float) -> None:
        self._replicas = {name: Replica(name, url) for name, url in replicas.items()}
        self._upstream = upstream
        self._poll_interval_s = poll_interval_s
        self._turn = itertools.count()
        self._stop = threading.Event()

    def start(self) -> None:
        """Poll every replica now, then in the background."""
        self.poll()
        threading.Thread(target=self._poll_forever, name="replica-poller", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def poll(self) -> None:
        """Refresh each replica's readiness and load from its /readyz."""
        for replica in self._replicas.values():
            try:
                response = self._upstream.request(
                    replica.name, replica.url, "GET", "/readyz", read_timeout_s=self._poll_interval_s
                )
                body = json.loads(response.data)
                replica.ready = response.status == 200 and body.get("replica_id") == replica.name
                replica.active_sessions = int(body.get("active_sessions", 0))
                replica.max_sessions = int(body.get("max_sessions", 1))
                replica.detail = str(body.get("detail", ""))
                replica.model = str(body.get("model", ""))
                if body.get("replica_id") != replica.name:
                    replica.detail = f"answers as {body.get('replica_id')!r}, configured as {replica.name!r}"
            except (ReplicaUnreachable, ValueError) as error:
                replica.ready, replica.detail = False, f"unreachable ({error})"

    def _poll_forever(self) -> None:
        while not self._stop.wait(self._poll_interval_s):
            try:
                self.poll()
            except Exception:
                logger.exception("polling replicas failed")

    def status(self) -> dict[str, dict]:
        """Per-replica state for the gateway's /readyz."""
        return {r.name: {"ready": r.ready, "active_sessions": r.active_sessions, "detail": r.detail}
                for r in self._replicas.values()}  # fmt: skip

    def any_ready(self) -> bool:
        return any(replica.ready for replica in self._replicas.values())

    def for_session(self, session_id: str) -> Replica:
        """The replica a session lives on, from its id; unknown replica: the session is gone."""
        name = session_id.rpartition(".")[0]
        replica = self._replicas.get(name)
        if replica is None:
            ROUTING_DECISIONS.labels(decision="unknown_replica", replica=name[:63] or "none").inc()
            raise SessionNotFound(session_id)
        ROUTING_DECISIONS.labels(decision="session", replica=name).inc()
        return replica

    def models(self) -> list[str]:
        """The model names the replicas reported (all replicas normally serve one model)."""
        return sorted({replica.model for replica in self._replicas.values() if replica.model})

    def by_affinity(self, key: str) -> list[Replica]:
        """Ready replicas in an order fixed by ``key`` (rendezvous hashing): every gateway worker
        sends the same conversation to the same replica while that replica stays ready."""
        ready = self._ready("conversation")
        ready.sort(key=lambda replica: hashlib.sha256(f"{replica.name}/{key}".encode()).digest(), reverse=True)
        ROUTING_DECISIONS.labels(decision="conversation", replica=ready[0].name).inc()
        return ready

    def least_loaded(self, decision: str) -> list[Replica]:
        """Ready replicas, best first: fewest sessions for ``new_session``, fewest requests in
        flight otherwise; ties rotate. ServiceUnavailable if none is ready."""
        ready = self._ready(decision)
        turn, names = next(self._turn), list(self._replicas)

        def load(replica: Replica) -> tuple[float, int]:
            rotation = (names.index(replica.name) - turn) % len(names)
            return (replica.session_load if decision == "new_session" else replica.in_flight), rotation

        ready.sort(key=load)
        ROUTING_DECISIONS.labels(decision=decision, replica=ready[0].name).inc()
        return ready

    def _ready(self, decision: str) -> list[Replica]:
        ready = [replica for replica in self._replicas.values() if replica.ready]
        if not ready:
            ROUTING_DECISIONS.labels(decision="no_ready_replica", replica="none").inc()
            raise ServiceUnavailable("No inference replica is ready; retry in a few seconds")
        return ready

    @contextmanager
    def in_flight(self, replica: Replica) -> Iterator[None]:
        """Count a request to ``replica`` while it runs (session-less balancing)."""
        replica.in_flight += 1
        try:
            yield
        finally:
            replica.in_flight -= 1

    def session_opened(self, replica: Replica) -> None:
        """This worker opened a session there: count it before the next poll does."""
        replica.active_sessions += 1

    def mark_down(self, replica: Replica, reason: str) -> None:
        """A call failed to connect: route around it until the next successful poll."""
        replica.ready, replica.detail = False, reason
        ROUTING_DECISIONS.labels(decision="replica_down", replica=replica.name).inc()
