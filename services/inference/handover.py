"""Sessions survive a planned stop: the stopping replica hands them over, the adopter rebuilds them.

On SIGTERM (services/common/gunicorn/gthread_worker.py calls ``SessionMover.hand_over_all`` before
the worker stops serving) the store stops taking sessions, ``/readyz`` says the replica is
stopping (the gateway sends it nothing new), each session's request in progress finishes, and
each session goes to a ready peer of the same model (``INFERENCE_PEERS``, and the replicas that
``INFERENCE_DISCOVERY`` gives when the handover starts, less this one and those of another model,
as their ``/readyz`` says; a conversation to the peer the gateway's rendezvous order picks, any
other to the least loaded), over
``ADOPT_SESSION_PATH`` with ``HANDOVER_TOKEN``. The adopter (``Adopter``) opens a Petals session,
sends the tokens through the swarm (as a rebuild after a swarm failure does) and holds the
session under its old id. A session no peer adopts is closed and its client gets the "expired"
answer; both outcomes are counted (``petals_chat_session_handovers``).
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import falcon

from services.common.api.discovery import Discovery
from services.common.api.handover import ADOPT_SESSION_PATH, SessionHandover, rendezvous_order
from services.common.api.params import loads_json
from services.common.web.errors import PayloadTooLarge, ServiceUnavailable, Unauthorized
from services.inference.decoding import IncrementalDecoder
from services.inference.driver import SwarmFailure
from services.inference.metrics import HANDOVER_SECONDS, HANDOVERS
from services.inference.model import ModelHandle
from services.inference.sessions import SessionStore
from services.inference.swarm_stepper import SwarmStepper

logger = logging.getLogger(__name__)
PEER_TIMEOUT_S = 2.0  # a peer's /readyz
ADOPT_TIMEOUT_S = 60.0  # one adoption: the adopter sends the session's tokens through the swarm
PEER_WAIT_S = 10.0  # how long a stopping replica looks for a ready peer
PARALLEL_HANDOVERS = 4
OFFERS_PER_PEER = 2  # a peer whose swarm step failed may succeed the second time
OFFER_PAUSE_S = 0.5
BYTES_PER_TOKEN = 96  # an adopt body's bound: token ids, and a conversation's text


@dataclass
class Peer:
    """Another replica of the model, as its /readyz described it."""

    name: str
    url: str
    load: float  # its sessions' share of its MAX_SESSIONS


class SessionMover:
    """Hands every session of a stopping replica to its peers."""

    def __init__(
        self,
        store: SessionStore,
        model_name: str,
        replica_id: str,
        token: str,
        peers: dict[str, str],
        discovery: Discovery | None = None,
    ) -> None:
        self._store = store
        self._model_name = model_name
        self._replica_id = replica_id
        self._token = token
        self._peers = peers  # INFERENCE_PEERS: id -> URL
        self._discovery = discovery or Discovery()
        self._lock = threading.Lock()

    def hand_over_all(self) -> tuple[int, int]:
        """Hand every session over; returns (handed over, failed)."""
        sessions = self._store.start_handover()
        if not sessions:
            return 0, 0
        peers = self._ready_peers()
        send = partial(self._send, peers)
        with ThreadPoolExecutor(max_workers=PARALLEL_HANDOVERS, thread_name_prefix="handover") as pool:
            results = list(pool.map(lambda s: self._store.hand_over(s, send, self._model_name), sessions))
        done, failed = sum(results), len(results) - sum(results)
        logger.info("handed over %d sessions to %s; %d could not be", done, [p.name for p in peers], failed)
        return done, failed

    def _ready_peers(self) -> list[Peer]:
        deadline = time.monotonic() + PEER_WAIT_S
        while True:
            candidates = self._candidates()
            with ThreadPoolExecutor(max_workers=max(1, len(candidates))) as pool:
                found = {p.name: p for p in pool.map(self._peer, candidates.items()) if p is not None}
            if found or time.monotonic() > deadline:
                return list(found.values())
            time.sleep(0.5)

    def _candidates(self) -> dict[str, str | None]:
        """URL -> the id it must answer as: INFERENCE_PEERS' ids, any for a discovered URL."""
        discovered: dict[str, str | None] = {found.url: None for found in self._discovery.find()}
        return {**discovered, **{url: name for name, url in self._peers.items()}}

    def _peer(self, candidate: tuple[str, str | None]) -> Peer | None:
        url, expected = candidate
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=PEER_TIMEOUT_S) as answer:
                body = json.loads(answer.read())
        except (OSError, ValueError):  # unready (503), gone, or not speaking JSON
            return None
        name = body.get("replica_id") if isinstance(body, dict) else None
        if not isinstance(name, str) or name == self._replica_id or expected not in (None, name):
            return None
        if body.get("model") != self._model_name:
            return None
        return Peer(name, url, int(body.get("active_sessions", 0)) / max(int(body.get("max_sessions", 1)), 1))

    def _send(self, peers: list[Peer], handover: SessionHandover) -> str | None:
        """Offer ``handover`` to the peers, best first; the adopter's name, or None."""
        started = time.perf_counter()
        for peer in [p for p in self._ranked(peers, handover) for _attempt in range(OFFERS_PER_PEER)]:
            if self._offer(peer, handover):
                seconds = time.perf_counter() - started
                HANDOVERS.labels(result="done").inc()
                HANDOVER_SECONDS.observe(seconds)
                logger.info("handover: %d tokens to %s in %.3f s", len(handover.token_ids), peer.name, seconds)
                return peer.name
            time.sleep(OFFER_PAUSE_S)
        HANDOVERS.labels(result="failed").inc()
        return None

    def _ranked(self, peers: list[Peer], handover: SessionHandover) -> list[Peer]:
        if handover.affinity is not None:
            order = rendezvous_order([p.name for p in peers], handover.affinity)
            return sorted(peers, key=lambda p: order.index(p.name))
        with self._lock:
            return sorted(peers, key=lambda p: p.load)

    def _offer(self, peer: Peer, handover: SessionHandover) -> bool:
        request = urllib.request.Request(
            peer.url + ADOPT_SESSION_PATH,
            data=json.dumps(handover.to_json()).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self._token}"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=ADOPT_TIMEOUT_S) as answer:
                answer.read()
        except (OSError, ValueError) as error:
            logger.warning("%s did not adopt %s: %s", peer.name, handover.session_id, error)
            return False
        with self._lock:
            peer.load += 0.001  # spread the next ones (the peer's own figure comes with its next /readyz)
        return True


class AdoptSessionResource:
    """``POST /internal/adopt_session``: hold a session a stopping peer hands over (bearer HANDOVER_TOKEN).

    Refused before any work without the token (401), while this replica is stopping, full or busy
    adopting (503: the peer tries another), or for another model (404)."""

    def __init__(self, model: ModelHandle, store: SessionStore, token: str) -> None:
        self._model = model
        self._stepper = SwarmStepper(model)
        self._store = store
        self._expected = f"Bearer {token}".encode()
        self._slots = threading.BoundedSemaphore(PARALLEL_HANDOVERS)

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        if not hmac.compare_digest((req.get_header("Authorization") or "").encode(), self._expected):
            raise Unauthorized("Adopting a session needs the deployment's HANDOVER_TOKEN")
        if not self._slots.acquire(blocking=False):
            raise ServiceUnavailable("This replica is busy adopting other sessions", retry_after_s=1)
        try:
            handover = self._read(req)
            self._adopt(handover)
        finally:
            self._slots.release()
        HANDOVERS.labels(result="adopted").inc()
        resp.media = {"ok": True}

    def _read(self, req: falcon.Request) -> SessionHandover:
        self._model.require_ready()
        limit = BYTES_PER_TOKEN * self._model.max_length + 4096
        if (req.content_length or 0) > limit:
            raise PayloadTooLarge(f"A handover is at most {limit} bytes here")
        body = req.bounded_stream.read(limit + 1)
        if len(body) > limit:
            raise PayloadTooLarge(f"A handover is at most {limit} bytes here")
        values = loads_json(body, "the handover")
        handover = SessionHandover.from_json(
            values, max_length=self._model.max_length, vocabulary=len(self._model.tokenizer)
        )
        self._model.require_model(handover.model)
        return handover

    def _adopt(self, handover: SessionHandover) -> None:
        self._store.check_adoptable(handover.session_id)
        petals = self._model.open_petals_session(handover.max_length)
        try:
            self._stepper.prefill(petals, list(handover.token_ids))
        except Exception as error:
            petals.close()
            raise SwarmFailure(f"Rebuilding the session on the swarm failed ({type(error).__name__})") from error
        decoder = IncrementalDecoder(self._model.token_bytes, handover.pending_bytes)
        self._store.adopt(handover, petals, decoder)
