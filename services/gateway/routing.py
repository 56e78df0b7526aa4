"""The routing and failover policy: which replica gets a call, and what a failed call becomes."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

from services.common.api.params import GenerateParams, Limits
from services.common.api.replica_request import CLOSE_SESSION_PATH, OPEN_SESSION_PATH, ReplicaRequest
from services.common.web.errors import (
    ERROR_CODE_HEADER,
    MOVED_TO_HEADER,
    ServiceUnavailable,
    SessionMoved,
    SessionNotFound,
)
from services.gateway.relay import read_answer
from services.gateway.replicas import Decision, Replica, ReplicaSet
from services.gateway.upstream import ReplicaAnswer, ReplicaUnreachable, Stream, Upstream

_RETRY_ELSEWHERE = {"too_many_sessions", "unavailable"}  # another replica may accept
MAX_MOVES = 2  # hops after a session that moved (a rolling restart moves it twice at most)


class Router:
    """Sends a validated call to the right replica and turns failures into public errors."""

    def __init__(
        self,
        replicas: ReplicaSet,
        upstream: Upstream,
        refresh: Callable[[], Awaitable[None]],
        find_new: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.replicas = replicas
        self.upstream = upstream
        self.refresh = refresh  # polls every replica now (the poller's)
        self.find_new = find_new  # discovers again now, if discovery is on and has not just run (the poller's)

    async def generate(self, params: GenerateParams, path: str, client: str) -> Stream:
        """``client``'s v1 / v2 generation: to its session's replica, else to the least busy one of its model."""
        if params.session_id:
            body = ReplicaRequest(params, client=client).to_json()
            return await self.to_session(params.session_id, params.model, "POST", path, json_body=body)
        model = self.replicas.resolve(params.model).name
        body = ReplicaRequest(dataclasses.replace(params, model=model), client=client).to_json()
        return await self.to_model(model, Decision.SESSIONLESS, "POST", path, json_body=body)

    async def open_session(self, model: str | None, max_length: int, client: str) -> ReplicaAnswer:
        """Open ``client``'s session on the least-loaded ready replica of ``model`` (None: the default)."""
        name = self.replicas.resolve(model).name
        fields = {"max_length": max_length, "model": name, "client": client}  # the client: its quota
        return await read_answer(
            await self.to_model(name, Decision.NEW_SESSION, "GET", OPEN_SESSION_PATH, fields=fields)
        )

    async def close_session(self, session_id: str, model: str | None, client: str) -> ReplicaAnswer:
        """Close ``session_id`` on its replica, if it is ``client``'s."""
        fields = {"session_id": session_id, "client": client}
        upstream = await self.to_session(session_id, model, "GET", CLOSE_SESSION_PATH, fields=fields)
        return await read_answer(upstream)

    async def to_session(self, session_id: str, model: str | None, method: str, path: str, **kwargs: Any) -> Stream:
        """Call the replica holding ``session_id``, following it where a stopping replica handed it
        over; a gone replica means a gone session, unless a fresh poll finds who adopted it. A replica
        this worker does not know yet may have been discovered meanwhile (another worker opened the
        session there): discovery runs again first."""
        if self.find_new is not None and not self.replicas.knows_holder(session_id):
            await self.find_new()
        replica = self.replicas.for_session(session_id, model)
        for _hop in range(MAX_MOVES + 1):
            try:
                response = await self.upstream.stream(replica.name, replica.url, method, path, **kwargs)
            except ReplicaUnreachable as error:
                replica = await self._after_unreachable(replica, session_id, model, error)
                continue
            moved_to = response.headers.get(MOVED_TO_HEADER)
            if response.headers.get(ERROR_CODE_HEADER) != SessionMoved.error_code or moved_to is None:
                return response
            response.close()
            replica = self.replicas.moved(session_id, moved_to)
            if replica is None:
                break
        raise SessionNotFound(session_id, detail="Its inference replica is gone.")

    async def _after_unreachable(
        self, replica: Replica, session_id: str, model: str | None, error: ReplicaUnreachable
    ) -> Replica:
        """Where to try next after ``replica`` failed: the session's adopter as a fresh poll reports it
        (it may have moved just before its replica stopped); else the session is gone."""
        if error.kind != "connect":
            raise SessionNotFound(session_id, detail="Its inference replica is gone.") from error
        self.replicas.mark_down(replica, f"unreachable ({error})")
        await self.refresh()
        found = self.replicas.for_session(session_id, model)
        if found is replica:
            raise SessionNotFound(session_id, detail="Its inference replica is gone.") from error
        return found

    async def to_model(self, model: str, decision: Decision, method: str, path: str, **kwargs: Any) -> Stream:
        """Call the least-loaded ready replica of ``model`` (by ``decision``'s measure), moving on
        while replicas are down or full."""
        candidates = self.replicas.least_loaded(decision, model)
        return await self._first_accepting(candidates, decision, method, path, **kwargs)

    async def to_conversation(self, key: str, model: str, method: str, path: str, **kwargs: Any) -> Stream:
        """Call the replica of ``model`` that holds (or will hold) the conversation ``key``, else the next."""
        candidates = self.replicas.by_affinity(key, model)
        return await self._first_accepting(candidates, Decision.CONVERSATION, method, path, **kwargs)

    async def _first_accepting(
        self, candidates: list[Replica], decision: Decision, method: str, path: str, **kwargs: Any
    ) -> Stream:
        for index, replica in enumerate(candidates):
            response = await self._try(replica, method, path, **kwargs)
            if response is not None and response.headers.get(ERROR_CODE_HEADER) == SessionMoved.error_code:
                response = await self._follow(response, method, path, **kwargs)  # a conversation handed over
            if response is None:
                continue
            if index < len(candidates) - 1 and response.headers.get(ERROR_CODE_HEADER) in _RETRY_ELSEWHERE:
                response.close()
                continue
            if decision is Decision.NEW_SESSION and ERROR_CODE_HEADER not in response.headers:
                self.replicas.session_opened(replica)
            return response
        raise ServiceUnavailable("No inference replica could take the request; retry in a few seconds")

    async def _follow(self, moved: Stream, method: str, path: str, **kwargs: Any) -> Stream | None:
        """The call again at the replica a stopping one handed the conversation to (None: unknown)."""
        replica = self.replicas.replicas.get(moved.headers.get(MOVED_TO_HEADER, ""))
        moved.close()
        response = None if replica is None else await self._try(replica, method, path, **kwargs)
        if response is not None and response.headers.get(ERROR_CODE_HEADER) == SessionMoved.error_code:
            response.close()  # moved on again meanwhile: the next candidate
            return None
        return response

    async def _try(self, replica: Replica, method: str, path: str, **kwargs: Any) -> Stream | None:
        try:
            with self.replicas.in_flight(replica):
                return await self.upstream.stream(replica.name, replica.url, method, path, **kwargs)
        except ReplicaUnreachable as error:
            if error.kind != "connect":
                raise ServiceUnavailable(f"Inference replica {replica.name} failed ({error.kind})") from error
            self.replicas.mark_down(replica, f"unreachable ({error})")
            return None


class RoutedResource:
    """Base of the API resources that route to the replicas, reading their inputs within ``limits``."""

    def __init__(self, router: Router, limits: Limits) -> None:
        self._router = router
        self._limits = limits
