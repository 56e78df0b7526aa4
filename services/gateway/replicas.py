"""The inference replicas a gateway routes to, and how it chooses one (no I/O here: poller.py
keeps each replica's state fresh from its ``/readyz``).

No shared store: a session's id starts with the id of the replica that holds it
(``inference-1.Xy...``), so any gateway replica, restarted or new, routes it by reading the id;
the session stays on that replica, hence on its model. Every other request is for a model:
the one it names, or the default one (``DEFAULT_MODEL``, else the model of the first replica in
``INFERENCE_REPLICAS`` that reported one). Among the ready replicas serving it, new sessions go to
the one with the fewest open sessions (polled, and counted up locally as this worker opens
sessions, so a burst spreads before the next poll); session-less requests to the one with the
fewest requests in flight from this worker. Ties rotate. Chat conversations (the OpenAI-compatible
API) go to the replica that rendezvous hashing picks for the conversation's opening messages, so
that a follow-up finds the session that holds its beginning.

A session handed over by a stopping replica (services/common/api/handover.py) keeps its id: the
replica that adopted it lists its key in its ``/readyz``, and a session whose key a replica lists
goes there (a ready claimant first) instead of to the replica its id names.

The set is dynamic with ``INFERENCE_DISCOVERY`` (services/common/api/discovery.py): a discovered
URL becomes a replica once its ``/readyz`` names its id (a known id at a new URL: the same replica,
moved); one that discovery no longer gives is forgotten, once it no longer answers as stopping.
``INFERENCE_REPLICAS`` entries stay. A request for a discovered model (``MODEL=dns://...``) with no
replica answering gets ``ModelStarting`` and is counted, for an autoscaler to start one.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum

from services.common.api.handover import rendezvous_order, session_key
from services.common.chat.model_card import ModelCard
from services.common.web.errors import (
    ModelMismatch,
    ModelNotFound,
    ModelStarting,
    ServiceUnavailable,
    SessionNotFound,
)
from services.gateway.metrics import REQUESTS_WITHOUT_REPLICA, ROUTING_DECISIONS


class Decision(StrEnum):
    """A routing decision; its value labels ``petals_chat_gateway_routing_decisions``."""

    NEW_SESSION = "new_session"  # least-loaded by open sessions
    SESSIONLESS = "sessionless"  # least-loaded by requests in flight
    SESSION = "session"  # the replica named in the session id
    ADOPTED = "adopted"  # the replica that adopted the session from a stopping one
    CONVERSATION = "conversation"  # by affinity
    # why none
    UNKNOWN_REPLICA = "unknown_replica"
    REPLICA_DOWN = "replica_down"
    NO_READY_REPLICA = "no_ready_replica"
    UNKNOWN_MODEL = "unknown_model"
    MODEL_MISMATCH = "model_mismatch"


@dataclass(eq=False)  # one object per replica, moved or not: in-flight counts and routing compare identity
class Replica:
    """One inference replica and what its last poll said."""

    name: str
    url: str
    ready: bool = False
    active_sessions: int = 0
    max_sessions: int = 1
    detail: str = "not polled yet"
    card: ModelCard | None = None  # the model it serves (from its /readyz)
    in_flight: int = 0  # requests this worker has sent and not yet seen answered
    answering: bool = False  # its last poll got an answer (ready or not)
    adopted: frozenset[str] = frozenset()  # keys of the sessions it adopted (services/common/api/handover.py)
    stopping: bool = False  # handing its sessions over: nothing new goes there
    static: bool = True  # from INFERENCE_REPLICAS (never forgotten); False: discovered

    @property
    def model(self) -> str | None:
        return self.card.name if self.card else None

    @property
    def session_load(self) -> float:
        return self.active_sessions / max(self.max_sessions, 1)


class ReplicaSet:
    """Configured and discovered replicas, their polled state, and the routing choices."""

    def __init__(
        self,
        replicas: dict[str, str],
        default_model: str | None = None,
        *,
        discovered_models: tuple[str, ...] = (),
        cold_start_retry_s: int = 15,
    ) -> None:
        self.replicas = {name: Replica(name, url) for name, url in replicas.items()}
        self._default_model = default_model
        self._discovered_models = discovered_models  # MODEL=dns://... entries: served even with no replica
        self._cold_start_retry_s = cold_start_retry_s
        for model in discovered_models:  # at 0 from the start: an autoscaler's first increase() sees the first request
            REQUESTS_WITHOUT_REPLICA.labels(model=model)
        self._found: set[str] = set()  # the URLs discovery gives now
        self._turn = itertools.count()

    # discovery -------------------------------------------------------------------------
    def discovered(self, urls: Iterable[str]) -> None:
        """The URLs discovery gives now (the replicas at the others are forgotten by ``forget_gone``)."""
        self._found = set(urls)

    def pending(self) -> list[str]:
        """Discovered URLs of no known replica: their /readyz will tell whose they are."""
        known = {replica.url for replica in self.replicas.values()}
        return sorted(self._found - known)

    def identified(self, name: str, url: str) -> Replica | None:
        """The replica whose /readyz at the discovered ``url`` says ``name``: a new one, or the known
        one moved there (a restarted pod's new address; the same object, so counts carry on); None if
        ``name`` is a static replica's (its configured URL stays)."""
        replica = self.replicas.get(name)
        if replica is None:
            replica = self.replicas[name] = Replica(name, url, static=False)
        elif replica.static:
            return None
        replica.url = url
        return replica

    def forget_gone(self) -> list[Replica]:
        """Forget the discovered replicas discovery no longer gives, but those still answering as
        stopping (handing their sessions over); returns them."""
        gone = [r for r in self.replicas.values() if not r.static and r.url not in self._found
                and not (r.answering and r.stopping)]  # fmt: skip
        for replica in gone:
            del self.replicas[replica.name]
        return gone

    def status(self) -> dict[str, dict]:
        """Per-replica state for the gateway's /readyz."""
        return {r.name: {"ready": r.ready, "model": r.model, "active_sessions": r.active_sessions, "detail": r.detail}
                for r in self.replicas.values()}  # fmt: skip

    def any_ready(self) -> bool:
        return any(replica.ready for replica in self.replicas.values())

    # models ---------------------------------------------------------------------------
    def cards(self) -> list[ModelCard]:
        """One card per served model, in the order of INFERENCE_REPLICAS (a model's first replica's)."""
        cards: dict[str, ModelCard] = {}
        for replica in self.replicas.values():
            if replica.card is not None:
                cards.setdefault(replica.card.name, replica.card)
        return list(cards.values())

    def default_model(self) -> str | None:
        """DEFAULT_MODEL, else the first served model, else the first discovered one; None while no
        replica has reported one."""
        cards = self.cards()
        first_discovered = self._discovered_models[0] if self._discovered_models else None
        return self._default_model or (cards[0].name if cards else first_discovered)

    def resolve(self, model: str | None) -> ModelCard:
        """The card of ``model`` (None: the default model); ModelNotFound if no replica serves it,
        ModelStarting (counted) for a discovered model with no replica answering."""
        cards = {card.name: card for card in self.cards()}
        wanted = model or self.default_model()
        if wanted in self._discovered_models and not self.answering(wanted):
            REQUESTS_WITHOUT_REPLICA.labels(model=wanted).inc()
            raise ModelStarting(wanted, self._cold_start_retry_s)
        if not cards:
            raise ServiceUnavailable("No inference replica has reported its model yet; retry in a few seconds")
        if wanted not in cards:
            ROUTING_DECISIONS.labels(decision=Decision.UNKNOWN_MODEL, replica="none").inc()
            if model is None:
                raise ServiceUnavailable(f"No replica serves the default model {wanted!r} now; served: {list(cards)}")
            raise ModelNotFound(model, list(cards))
        return cards[wanted]

    # choosing a replica ----------------------------------------------------------------
    def for_session(self, session_id: str, model: str | None = None) -> Replica:
        """The replica a session lives on, from its id; unknown replica: the session is gone.
        A ``model`` given with the session must be the session's."""
        adopter = self._adopter(session_id)
        name = adopter.name if adopter else session_id.rpartition(".")[0]
        replica = self.replicas.get(name)
        if replica is None:
            ROUTING_DECISIONS.labels(
                decision=Decision.UNKNOWN_REPLICA, replica="none"
            ).inc()  # the name is the client's
            raise SessionNotFound(session_id)
        if model is not None:
            self.resolve(model)  # an unknown model is that error first
            if replica.model is not None and replica.model != model:
                ROUTING_DECISIONS.labels(decision=Decision.MODEL_MISMATCH, replica=name).inc()
                raise ModelMismatch(session_id, replica.model, model)
        ROUTING_DECISIONS.labels(decision=Decision.ADOPTED if adopter else Decision.SESSION, replica=name).inc()
        return replica

    def knows_holder(self, session_id: str) -> bool:
        """Whether this worker knows a replica that may hold ``session_id`` (by its id, or adopted)."""
        return session_id.rpartition(".")[0] in self.replicas or self._adopter(session_id) is not None

    def _adopter(self, session_id: str) -> Replica | None:
        """The replica that lists the session as adopted, a ready one first; None if none does."""
        key = session_key(session_id)
        claimants = [replica for replica in self.replicas.values() if key in replica.adopted]
        return max(claimants, key=lambda replica: replica.ready, default=None)

    def moved(self, session_id: str, to: str) -> Replica | None:
        """The replica a stopping one says the session moved to, if this worker knows it."""
        replica = self.replicas.get(to)
        if replica is not None:
            ROUTING_DECISIONS.labels(decision=Decision.ADOPTED, replica=replica.name).inc()
        return replica

    def by_affinity(self, key: str, model: str) -> list[Replica]:
        """Replicas of ``model`` for the conversation ``key``: one that adopted it and is handing it
        over (it may hold a later session of it, or redirect to where that went) first, then a ready
        one that adopted it, then the ready and stopping ones in an order fixed by ``key`` (rendezvous
        hashing): every gateway worker sends the same conversation to the same replica while it stays
        ready (a stopping one holds its conversations until they moved, and refuses new ones)."""
        ready = self._ready(model)
        serving = {r.name: r for r in [*ready, *(r for r in self.replicas.values() if r.stopping and r.model == model)]}
        claimed, adopted_key = [], session_key(key)
        for stopping in (True, False):
            claimed += [r for r in serving.values() if adopted_key in r.adopted and r.stopping is stopping]
        ranked = [serving[name] for name in rendezvous_order(serving, key) if serving[name] not in claimed]
        ready = claimed + ranked
        ROUTING_DECISIONS.labels(decision=Decision.CONVERSATION, replica=ready[0].name).inc()
        return ready

    def least_loaded(self, decision: Decision, model: str) -> list[Replica]:
        """Ready replicas of ``model``, best first: fewest sessions for ``NEW_SESSION``, fewest
        requests in flight for ``SESSIONLESS``; ties rotate. ServiceUnavailable if none is ready."""
        ready = self._ready(model)
        turn, names = next(self._turn), list(self.replicas)

        def load(replica: Replica) -> tuple[float, int]:
            rotation = (names.index(replica.name) - turn) % len(names)
            return (replica.session_load if decision is Decision.NEW_SESSION else replica.in_flight), rotation

        ready.sort(key=load)
        ROUTING_DECISIONS.labels(decision=decision, replica=ready[0].name).inc()
        return ready

    def answering(self, model: str) -> list[Replica]:
        """Replicas of ``model`` that answered their last poll, ready or not, the ready ones first."""
        replicas = [replica for replica in self.replicas.values() if replica.answering and replica.model == model]
        return sorted(replicas, key=lambda replica: not replica.ready)

    def _ready(self, model: str) -> list[Replica]:
        ready = [replica for replica in self.replicas.values() if replica.ready and replica.model == model]
        if not ready:
            ROUTING_DECISIONS.labels(decision=Decision.NO_READY_REPLICA, replica="none").inc()
            raise ServiceUnavailable(f"No inference replica of {model} is ready; retry in a few seconds")
        return ready

    # bookkeeping -----------------------------------------------------------------------
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
        replica.ready, replica.answering, replica.detail = False, False, reason
        ROUTING_DECISIONS.labels(decision=Decision.REPLICA_DOWN, replica=replica.name).inc()
