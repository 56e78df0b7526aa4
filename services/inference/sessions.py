"""Users' inference sessions held by this replica.

A session pairs a Petals ``InferenceSession`` (attention caches on the swarm's servers) with
the client-side state that must survive between requests: the incremental decoder and the
session's size. Rules:

- one request at a time per session: a second concurrent request gets ``SessionBusy``;
- idle sessions expire after the TTL (refreshed by every use); a reaper thread closes them so
  the servers free their caches;
- at most ``max_sessions`` open; one more is refused with a clear error, others unharmed
  (a conversation session, which no client holds an id of, makes room by evicting the
  least recently used idle conversation session);
- a session is its client's (the ``client`` the gateway names: an API key id or an address;
  None for a replica called directly): another client that uses or closes it, or whose prompt
  extends its conversation, gets exactly what an unknown session gets (ids cannot be probed);
  the gateway closes the sessions of a removed API key (``close_client``);
- a client holds at most
  ``max_sessions_per_client`` sessions (0: no quota); a client at its quota that opens one more
  gets room by closing its own least recently used idle session (reason ``quota``), so a user who
  reloads the chat page is never stuck; if all of them are busy, ``SessionQuotaExceeded`` (429);
- a request without a session gets a Petals session of its own (``open_one_off``): at most
  ``max_one_off`` at once, as they reserve the servers' caches too; one more is refused
  (``TooManySessions``, which the gateway retries on another replica);
- conversation sessions are opened implicitly (the OpenAI-compatible chat API): a later
  request whose prompt extends the exact text such a session holds continues it;
- Petals sessions are always closed explicitly (left to the garbage collector they can
  deadlock the client), outside the store's lock, and all of them on shutdown.

A request holds a session through a ``SessionLease``: the only way generation changes a session
(its Petals session after a rebuild, its text, its retirement). ``OneOffLease`` gives a request
without a session the same interface over a Petals session of its own.

Session ids are ``<replica id>.<random token>``: the gateway routes by the replica part, unless
the session was handed over. On a planned stop (services/inference/handover.py) the store stops
taking sessions and hands each over, once its request in progress has finished: a request that
comes for it meanwhile waits for the move, then gets ``SessionMoved`` (the gateway follows it),
or ``SessionNotFound`` if it could not be handed over. A handed-over session keeps its id on the
replica that adopts it (``adopt``), which publishes the keys of what it adopted.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from services.common.api.handover import SessionHandover, session_key
from services.common.web.errors import (
    ServiceUnavailable,
    SessionBusy,
    SessionMoved,
    SessionNotFound,
    SessionQuotaExceeded,
    TooManySessions,
)
from services.inference.decoding import IncrementalDecoder
from services.inference.metrics import (
    ACTIVE_SESSIONS,
    QUEUED_REQUESTS_ALIAS,
    REQUESTS_WAITING,
    SESSIONS_CLOSED,
    SESSIONS_OPENED,
    counted,
    publish_session_load,
)
from services.inference.session_tokens import SessionTokens

logger = logging.getLogger(__name__)
HANDOVER_WAIT_S = 60.0  # the longest a handover waits for a session's request, or a request for its move


@dataclass
class Session:
    """One user's inference session and its client-side state."""

    session_id: str
    max_length: int
    petals: Any  # petals.client.InferenceSession
    decoder: IncrementalDecoder | None = None
    last_used: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)
    close_reason: str | None = None  # set when closed while a request was still using it
    conversation: bool = False  # opened implicitly; matched by its text, not by its id
    text: str = ""  # a conversation session's text (prompts and outputs) after its last request
    client: str | None = None  # its owner, whose quota it counts toward (None: a replica called directly)
    affinity: str | None = None  # a conversation's routing key (the gateway's), for a handover
    adopted: bool = False  # handed over from another replica: its key is published
    moving: threading.Event | None = None  # set once a handover of it has ended, either way

    @property
    def tokens(self) -> SessionTokens:
        """The tokens the session holds so far (prompts and generated tokens)."""
        return SessionTokens(self.petals)


class SessionLease:
    """One request's exclusive use of a stored session; ``release`` (or leaving a ``with``) ends it."""

    def __init__(self, store: SessionStore, session: Session) -> None:
        self._store = store
        self._session = session

    def __enter__(self) -> SessionLease:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    @property
    def session_id(self) -> str:
        return self._session.session_id

    @property
    def max_length(self) -> int:
        return self._session.max_length

    @property
    def conversation(self) -> bool:
        """Opened implicitly: its client holds no id, and its text is what a later request matches."""
        return self._session.conversation

    @property
    def resumable(self) -> bool:
        """Whether a later request may go on from where this one stops (its client holds the id)."""
        return not self._session.conversation

    @property
    def petals(self) -> Any:
        return self._session.petals

    @property
    def text(self) -> str:
        return self._session.text

    @property
    def decoder(self) -> IncrementalDecoder | None:
        """The decoder that carries an incomplete character from one request to the next."""
        return self._session.decoder

    @decoder.setter
    def decoder(self, decoder: IncrementalDecoder) -> None:
        self._session.decoder = decoder

    @property
    def tokens(self) -> SessionTokens:
        return self._session.tokens

    @property
    def token_count(self) -> int:
        return self.tokens.count()

    def replace_petals(self, petals_session: Any) -> Any:
        """Put a fresh Petals session in place (a rebuild); returns the old one, for the caller to close."""
        old, self._session.petals = self._session.petals, petals_session
        return old

    def record_text(self, text: str) -> None:
        """Remember a conversation session's whole text, for the next request to match."""
        self._session.text = text

    def retire(self, reason: str) -> None:
        """Close the session for good (``reason`` as the metrics say) once this lease is released."""
        self._store.close(self._session.session_id, reason=reason, client=self._session.client)

    def release(self) -> None:
        """End the request's use: the expiry restarts, or a close asked meanwhile happens now."""
        self._store.release(self._session)


class OneOffLease:
    """A lease's interface over a request's own Petals session (no session id); released, it closes."""

    session_id = None
    conversation = False
    resumable = False
    decoder = None
    text = ""

    def __init__(self, petals_session: Any, max_length: int, on_release: Callable[[], None] = lambda: None) -> None:
        self.petals = petals_session
        self.max_length = max_length
        self._on_release = on_release  # called once, after closing

    @property
    def tokens(self) -> SessionTokens:
        return SessionTokens(self.petals)

    @property
    def token_count(self) -> int:
        return self.tokens.count()

    def replace_petals(self, petals_session: Any) -> Any:
        old, self.petals = self.petals, petals_session
        return old

    def record_text(self, text: str) -> None:
        """Nothing to remember: no later request can continue."""

    def retire(self, reason: str) -> None:
        """Nothing to retire: ``release`` closes the Petals session anyway."""

    def release(self) -> None:
        on_release, self._on_release = self._on_release, lambda: None
        try:
            self.petals.close()
        finally:
            on_release()


class SessionStore:
    """Open sessions of this replica, keyed by session id."""

    def __init__(
        self,
        open_petals_session: Callable[[int], Any],
        *,
        replica_id: str,
        ttl_s: float,
        max_sessions: int,
        max_sessions_per_client: int = 0,
        max_one_off: int = 16,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._open_petals_session = open_petals_session
        self._replica_id = replica_id
        self._ttl_s = ttl_s
        self._max_sessions = max_sessions
        self._max_per_client = max_sessions_per_client
        self._max_one_off = max_one_off
        self._one_off_slots = threading.BoundedSemaphore(max_one_off)
        self._clock = clock
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self._reaper_stop = threading.Event()
        self._stopping = False  # handing over: no new session
        self._moved: dict[str, tuple[str, str | None]] = {}  # handed-over id -> (adopter, client)
        self._moved_conversations: dict[str, str] = {}  # a handed-over conversation's text -> its id

    def __len__(self) -> int:
        return len(self._sessions)

    @property
    def stopping(self) -> bool:
        """Whether the store has stopped taking sessions (its replica is handing them over)."""
        return self._stopping

    def open(
        self, max_length: int, *, conversation: bool = False, client: str | None = None, affinity: str | None = None
    ) -> Session:
        """Open a session reserving ``max_length`` tokens (for ``client``'s quota); TooManySessions at
        the limit, SessionQuotaExceeded when the client's quota is full of busy sessions."""
        evicted, over_quota = None, None
        try:
            with self._lock:
                self._require_taking()
                if client is not None and self._max_per_client:
                    over_quota = self._pop_for_quota(client)
                if len(self._sessions) >= self._max_sessions and conversation:
                    evicted = self._pop_least_recent_idle_conversation()
                if len(self._sessions) >= self._max_sessions:
                    raise TooManySessions(
                        f"This replica already holds its maximum of {self._max_sessions} sessions; "
                        "close unused sessions or retry shortly"
                    )
                session_id = f"{self._replica_id}.{secrets.token_urlsafe(16)}"
                petals = self._open_petals_session(max_length)
                session = Session(
                    session_id, max_length, petals, conversation=conversation, client=client, affinity=affinity
                )
                session.last_used = self._clock()
                self._sessions[session_id] = session
        finally:  # what was taken out to make room is closed, whatever happened next
            for taken, reason in ((over_quota, "quota"), (evicted, "evicted")):
                if taken is not None:
                    self._retire(taken, reason)
        SESSIONS_OPENED.inc()
        ACTIVE_SESSIONS.inc()
        publish_session_load(len(self._sessions), self._max_sessions)
        return session

    def open_one_off(self, max_length: int) -> OneOffLease:
        """A Petals session of a request's own, reserving ``max_length`` tokens; TooManySessions when
        ``max_one_off`` of them are in use."""
        if not self._one_off_slots.acquire(blocking=False):
            raise TooManySessions(
                f"This replica already serves its maximum of {self._max_one_off} requests without a session "
                "(MAX_SESSIONLESS_REQUESTS); retry shortly",
                retry_after_s=1,
            )
        try:
            return OneOffLease(self._open_petals_session(max_length), max_length, self._one_off_slots.release)
        except BaseException:
            self._one_off_slots.release()
            raise

    def acquire(self, session_id: str, client: str | None = None) -> SessionLease:
        """Exclusive use of ``client``'s session for one request, until the lease is released."""
        session = self._get_live(session_id, client)
        if session.moving is not None:
            with counted(REQUESTS_WAITING, QUEUED_REQUESTS_ALIAS):
                session.moving.wait(HANDOVER_WAIT_S)
            session = self._get_live(session_id, client)  # moved (SessionMoved) or gone (SessionNotFound)
        if not session.lock.acquire(blocking=False):
            raise SessionBusy(f"Session {session_id} is busy with another request; retry when it has finished")
        if session.close_reason is not None:
            session.lock.release()
            raise SessionNotFound(session_id)
        return SessionLease(self, session)

    def acquire_conversation(self, prompt: str, client: str | None = None) -> SessionLease | None:
        """Exclusive use of ``client``'s idle conversation session holding the longest prefix of ``prompt``;
        SessionMoved if it is being handed over or was."""
        now = self._clock()
        with self._lock:
            candidates = [
                s
                for s in self._sessions.values()
                if s.conversation and s.client == client and s.text and prompt.startswith(s.text)
                and not self._is_expired(s, now)
            ]  # fmt: skip
            moving = next((s for s in candidates if s.moving is not None), None)
            for session in sorted(candidates, key=lambda s: len(s.text), reverse=True):
                if session.moving is None and session.close_reason is None and session.lock.acquire(blocking=False):
                    return SessionLease(self, session)
            if moving is None:
                self._raise_if_conversation_moved(prompt, client)
                return None
        with counted(REQUESTS_WAITING, QUEUED_REQUESTS_ALIAS):
            moving.moving.wait(HANDOVER_WAIT_S)  # its move ends either way
        with self._lock:
            self._raise_if_conversation_moved(prompt, client)
        return None

    def _raise_if_conversation_moved(self, prompt: str, client: str | None) -> None:
        moved = [(text, session_id) for text, session_id in self._moved_conversations.items()
                 if prompt.startswith(text) and self._moved[session_id][1] == client]  # fmt: skip
        if moved:
            session_id = max(moved, key=lambda entry: len(entry[0]))[1]
            raise SessionMoved(session_id, self._moved[session_id][0])

    def release(self, session: Session) -> None:
        """End a request's use (``SessionLease.release``): refresh the expiry, or close it if closing
        was asked meanwhile."""
        session.last_used = self._clock()
        reason = session.close_reason
        session.lock.release()
        if reason is not None:
            self._retire(session, reason)

    def close(self, session_id: str, reason: str = "closed", *, client: str | None = None) -> None:
        """Close ``client``'s session now, or as soon as the request using it finishes."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None or session.client != client:
                self._raise_if_moved(session_id, client)
                raise SessionNotFound(session_id)
            del self._sessions[session_id]
        self._retire(session, reason)

    def close_client(self, client: str, reason: str = "revoked") -> int:
        """Close every session of ``client`` (its API key was removed); returns how many."""
        with self._lock:
            owned = [s for s in self._sessions.values() if s.client == client]
            for session in owned:
                del self._sessions[session.session_id]
        for session in owned:
            self._retire(session, reason)
        return len(owned)

    def reap_expired(self) -> int:
        """Close sessions idle for longer than the TTL; returns how many."""
        now = self._clock()
        with self._lock:
            expired = [s for s in self._sessions.values()
                       if self._is_expired(s, now) and not s.lock.locked() and s.moving is None]  # fmt: skip
            for session in expired:
                del self._sessions[session.session_id]
        for session in expired:
            self._retire(session, "expired")
        return len(expired)

    def close_all(self, reason: str = "shutdown") -> None:
        """Close every session (replica shutdown), concurrently: shutdown stays short."""
        with self._lock:
            sessions = list(self._sessions.values())
            self._sessions.clear()
        if sessions:
            with ThreadPoolExecutor(max_workers=min(16, len(sessions))) as pool:
                list(pool.map(lambda session: self._retire(session, reason), sessions))

    def start_reaper(self, interval_s: float) -> None:
        """Reap expired sessions every ``interval_s`` seconds in a daemon thread."""

        def run() -> None:
            while not self._reaper_stop.wait(interval_s):
                try:
                    self.reap_expired()
                except Exception:
                    logger.exception("session reaper failed")

        threading.Thread(target=run, name="session-reaper", daemon=True).start()

    def stop_reaper(self) -> None:
        """Stop the reaper thread."""
        self._reaper_stop.set()

    def _get_live(self, session_id: str, client: str | None) -> Session:
        expired = None
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                self._raise_if_moved(session_id, client)
            if session is not None and session.client != client:
                session = None  # another client's: as unknown as a missing one
            elif session is not None and self._is_expired(session, self._clock()) and not session.lock.locked():
                del self._sessions[session_id]
                expired = session
        if expired is not None:
            self._retire(expired, "expired")
            session = None
        if session is None:
            raise SessionNotFound(session_id)
        return session

    def _raise_if_moved(self, session_id: str, client: str | None) -> None:
        moved = self._moved.get(session_id)
        if moved is not None and moved[1] == client:
            raise SessionMoved(session_id, moved[0])

    def _require_taking(self) -> None:
        if self._stopping:
            raise ServiceUnavailable("This replica is stopping; its sessions move to another replica", retry_after_s=1)

    # handover ----------------------------------------------------------------------------
    def start_handover(self) -> list[Session]:
        """Take no more sessions; mark every session as moving (their requests wait) and return them."""
        with self._lock:
            self._stopping = True
            sessions = list(self._sessions.values())
            for session in sessions:
                session.moving = threading.Event()
        return sessions

    def hand_over(self, session: Session, send: Callable[[SessionHandover], str | None], model: str) -> bool:
        """Once its request in progress has finished, send ``session`` (``send`` returns the adopter's id,
        or None); it leaves this store either way, and its waiting requests learn where it went."""
        assert session.moving is not None, "start_handover() first"
        got_lock = session.lock.acquire(timeout=HANDOVER_WAIT_S)
        adopter = None
        try:
            if got_lock and session.petals is not None and session.close_reason is None:
                adopter = send(self._handover_of(session, model))
        except Exception:
            logger.warning("handing over %s failed", session.session_id, exc_info=True)
        finally:
            with self._lock:
                self._sessions.pop(session.session_id, None)
                if adopter is not None:
                    self._moved[session.session_id] = (adopter, session.client)
                    if session.conversation and session.text:
                        self._moved_conversations[session.text] = session.session_id
            session.close_reason = "handed_over" if adopter else "handover_failed"
            if got_lock:
                self._close_petals(session, session.close_reason)
                session.lock.release()
            session.moving.set()
        return adopter is not None

    def _handover_of(self, session: Session, model: str) -> SessionHandover:
        return SessionHandover(
            session_id=session.session_id,
            model=model,
            max_length=session.max_length,
            token_ids=tuple(session.tokens.ids()),
            pending_bytes=session.decoder.pending() if session.decoder else b"",
            idle_s=max(0.0, self._clock() - session.last_used),
            client=session.client,
            conversation=session.conversation,
            text=session.text,
            affinity=session.affinity,
        )

    def check_adoptable(self, session_id: str) -> None:
        """Refuse an adoption before any work: stopping, full, or the id already held."""
        with self._lock:
            self._refuse_adoption(session_id)

    def _refuse_adoption(self, session_id: str) -> None:
        self._require_taking()
        if len(self._sessions) >= self._max_sessions:
            raise TooManySessions(f"This replica already holds its maximum of {self._max_sessions} sessions")
        if session_id in self._sessions:
            raise SessionBusy(f"Session {session_id} is already held here")

    def adopt(self, handover: SessionHandover, petals: Any, decoder: IncrementalDecoder) -> Session:
        """Hold a handed-over session (its Petals session rebuilt by the caller) under its old id."""
        session = Session(
            handover.session_id, handover.max_length, petals, decoder=decoder, conversation=handover.conversation,
            text=handover.text, client=handover.client, affinity=handover.affinity, adopted=True,
        )  # fmt: skip
        session.last_used = self._clock() - handover.idle_s
        try:
            with self._lock:
                self._refuse_adoption(handover.session_id)
                self._sessions[session.session_id] = session
                self._moved.pop(session.session_id, None)  # back on a replica that once handed it over
        except BaseException:
            petals.close()
            raise
        SESSIONS_OPENED.inc()
        ACTIVE_SESSIONS.inc()
        publish_session_load(len(self._sessions), self._max_sessions)
        return session

    def adopted_keys(self) -> list[str]:
        """The keys of the sessions held here that another replica handed over, and of their
        conversations' routing keys (for the gateway)."""
        with self._lock:
            adopted = [s for s in self._sessions.values() if s.adopted]
        return [session_key(s.session_id) for s in adopted] + [session_key(s.affinity) for s in adopted if s.affinity]

    def _pop_for_quota(self, client: str) -> Session | None:
        """Below its quota: None; at it, its least recently used idle session (removed), to close."""
        owned = [s for s in self._sessions.values() if s.client == client]
        if len(owned) < self._max_per_client:
            return None
        idle = [s for s in owned if not s.lock.locked()]
        if not idle:
            raise SessionQuotaExceeded(
                f"This client already holds its quota of {self._max_per_client} sessions, all busy "
                "generating; close one or retry when one has finished",
                headers={"Retry-After": "5"},
            )
        session = min(idle, key=lambda s: s.last_used)
        del self._sessions[session.session_id]
        return session

    def _pop_least_recent_idle_conversation(self) -> Session | None:
        idle = [s for s in self._sessions.values() if s.conversation and not s.lock.locked()]
        if not idle:
            return None
        session = min(idle, key=lambda s: s.last_used)
        del self._sessions[session.session_id]
        return session

    def _is_expired(self, session: Session, now: float) -> bool:
        return now - session.last_used > self._ttl_s

    def _retire(self, session: Session, reason: str) -> None:
        """Close now if idle; otherwise the request holding it closes it when done."""
        session.close_reason = reason
        if session.lock.acquire(blocking=False):
            try:
                self._close_petals(session, reason)
            finally:
                session.lock.release()

    def _close_petals(self, session: Session, reason: str) -> None:
        if session.petals is None:
            return
        petals_session, session.petals = session.petals, None
        try:
            petals_session.close()
        except Exception:
            logger.warning("closing Petals session of %s failed", session.session_id, exc_info=True)
        SESSIONS_CLOSED.labels(reason=reason).inc()
        ACTIVE_SESSIONS.dec()
        publish_session_load(len(self._sessions), self._max_sessions)
        logger.info("session %s closed (%s)", session.session_id, reason)
