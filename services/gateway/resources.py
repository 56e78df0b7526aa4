"""HTTP resources of the gateway: the v1 API and the SSE stream, relayed to inference replicas."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import falcon
import falcon.asgi

from services.common.api.params import (
    GenerateParams,
    Limits,
    get_model,
    get_session_id,
    parse_generate,
    parse_open_session,
    read_values_async,
)
from services.common.api.replica_request import ReplicaRequest
from services.common.web.errors import (
    ERROR_CODE_HEADER,
    ERROR_STATUS_HEADER,
    ApiError,
    ServiceUnavailable,
    SessionNotFound,
)
from services.common.web.sse import SSE_CONTENT_TYPE, SSE_HEADERS, sse_error
from services.gateway.replicas import Replica, ReplicaSet
from services.gateway.upstream import Answer, ReplicaUnreachable, Stream, Upstream

logger = logging.getLogger(__name__)
_RETRY_ELSEWHERE = {"too_many_sessions", "unavailable"}  # another replica may accept


class Request(falcon.asgi.Request):
    """Falcon's ASGI request, keeping the ASGI ``receive`` callable: a relayed stream watches it
    for the client going away (the server's ``send`` does nothing once it has)."""

    def __init__(self, scope: dict, receive: Callable[[], Coroutine[Any, Any, dict]], *args: Any, **kwargs: Any):
        super().__init__(scope, receive, *args, **kwargs)
        self.asgi_receive = receive


class Router:
    """Sends a validated call to the right replica and turns failures into public errors."""

    def __init__(self, replicas: ReplicaSet, upstream: Upstream) -> None:
        self.replicas = replicas
        self.upstream = upstream

    async def generate(self, params: GenerateParams, path: str, client: str) -> Stream:
        """``client``'s v1 / v2 generation: to its session's replica, else to the least busy one of its model."""
        if params.session_id:
            body = ReplicaRequest(params, client=client).to_json()
            return await self.to_session(params.session_id, params.model, "POST", path, json_body=body)
        model = self.replicas.resolve(params.model).name
        body = ReplicaRequest(dataclasses.replace(params, model=model), client=client).to_json()
        return await self.to_model(model, "sessionless", "POST", path, json_body=body)

    async def to_session(self, session_id: str, model: str | None, method: str, path: str, **kwargs: Any) -> Stream:
        """Call the replica holding ``session_id``; a gone replica means a gone session."""
        replica = self.replicas.for_session(session_id, model)
        try:
            return await self.upstream.stream(replica.name, replica.url, method, path, **kwargs)
        except ReplicaUnreachable as error:
            if error.kind == "connect":
                self.replicas.mark_down(replica, f"unreachable ({error})")
            raise SessionNotFound(session_id, detail="Its inference replica is gone.") from error

    async def to_model(self, model: str, decision: str, method: str, path: str, **kwargs: Any) -> Stream:
        """Call the least-loaded ready replica of ``model``, moving on while replicas are down or full."""
        candidates = self.replicas.least_loaded(decision, model)
        return await self._first_accepting(candidates, decision, method, path, **kwargs)

    async def to_conversation(self, key: str, model: str, method: str, path: str, **kwargs: Any) -> Stream:
        """Call the replica of ``model`` that holds (or will hold) the conversation ``key``, else the next."""
        candidates = self.replicas.by_affinity(key, model)
        return await self._first_accepting(candidates, "conversation", method, path, **kwargs)

    async def _first_accepting(
        self, candidates: list[Replica], decision: str, method: str, path: str, **kwargs: Any
    ) -> Stream:
        for index, replica in enumerate(candidates):
            response = await self._try(replica, method, path, **kwargs)
            if response is None:
                continue
            if index < len(candidates) - 1 and response.headers.get(ERROR_CODE_HEADER) in _RETRY_ELSEWHERE:
                response.close()
                continue
            if decision == "new_session" and ERROR_CODE_HEADER not in response.headers:
                self.replicas.session_opened(replica)
            return response
        raise ServiceUnavailable("No inference replica could take the request; retry in a few seconds")

    async def _try(self, replica: Replica, method: str, path: str, **kwargs: Any) -> Stream | None:
        try:
            with self.replicas.in_flight(replica):
                return await self.upstream.stream(replica.name, replica.url, method, path, **kwargs)
        except ReplicaUnreachable as error:
            if error.kind != "connect":
                raise ServiceUnavailable(f"Inference replica {replica.name} failed ({error.kind})") from error
            self.replicas.mark_down(replica, f"unreachable ({error})")
            return None


async def read_answer(upstream: Stream) -> Answer:
    """A replica's whole answer; breaking off while sending it is a 503."""
    try:
        return await upstream.read()
    except ReplicaUnreachable as error:
        raise ServiceUnavailable(f"Inference replica {error.replica} failed ({error.kind})") from error


def relay(resp: falcon.asgi.Response, upstream: Answer) -> None:
    """Answer with a replica's (already read) response."""
    resp.status = upstream.status
    resp.content_type = upstream.headers.get("Content-Type", falcon.MEDIA_JSON)
    resp.data = upstream.data
    for header in (ERROR_CODE_HEADER, ERROR_STATUS_HEADER, "Retry-After"):
        if header in upstream.headers:
            resp.set_header(header, upstream.headers[header])
    if ERROR_STATUS_HEADER in upstream.headers:
        resp.context.error_status = upstream.headers[ERROR_STATUS_HEADER]


class GenerateResource:
    """``POST /api/v1/generate`` (seed contract)."""

    error_envelope = "v1"

    def __init__(self, router: Router, limits: Limits) -> None:
        self._router = router
        self._limits = limits

    async def on_post(self, req: Request, resp: falcon.asgi.Response) -> None:
        params = parse_generate(await read_values_async(req, self._limits), self._limits)
        upstream = await self._router.generate(params, "/api/v1/generate", req.context.client.name)
        relay(resp, await read_answer(upstream))


class OpenSessionResource:
    """``GET /api/v1/open_inference_session``: on the least-loaded ready replica of the model."""

    error_envelope = "v1"

    def __init__(self, router: Router, limits: Limits) -> None:
        self._router = router
        self._limits = limits

    async def on_get(self, req: Request, resp: falcon.asgi.Response) -> None:
        values = await read_values_async(req, self._limits)
        max_length = parse_open_session(values, self._limits)
        model = self._router.replicas.resolve(get_model(values)).name
        fields = {"max_length": max_length, "model": model, "client": req.context.client.name}  # its quota
        path = "/api/v1/open_inference_session"
        relay(resp, await read_answer(await self._router.to_model(model, "new_session", "GET", path, fields=fields)))


class CloseSessionResource:
    """``GET /api/v1/close_inference_session``: on the replica holding the session, if it is the client's."""

    error_envelope = "v1"

    def __init__(self, router: Router, limits: Limits) -> None:
        self._router = router
        self._limits = limits

    async def on_get(self, req: Request, resp: falcon.asgi.Response) -> None:
        values = await read_values_async(req, self._limits)
        session_id = get_session_id(values, required=True)
        path, fields = "/api/v1/close_inference_session", {"session_id": session_id, "client": req.context.client.name}
        upstream = await self._router.to_session(session_id, get_model(values), "GET", path, fields=fields)
        relay(resp, await read_answer(upstream))


class GenerateStreamResource:
    """``POST /api/v2/generate_stream``: the replica's Server-Sent Events, relayed as they come."""

    def __init__(self, router: Router, limits: Limits) -> None:
        self._router = router
        self._limits = limits

    async def on_post(self, req: Request, resp: falcon.asgi.Response) -> None:
        params = parse_generate(await read_values_async(req, self._limits), self._limits)
        upstream = await self._router.generate(params, "/api/v2/generate_stream", req.context.client.name)
        if upstream.status != 200:
            relay(resp, await read_answer(upstream))  # the (small) error body
            return
        resp.content_type = SSE_CONTENT_TYPE
        resp.set_headers(SSE_HEADERS)
        resp.stream = ClientStream(req, _relay_events(upstream, params.session_id))


class ClientStream:
    """A response body relayed to a client (``resp.stream``) that ends as soon as the client has gone
    (the server's ``send`` silently does nothing then) and, when Falcon closes it, closes what it
    relays: the replica's stream, so that the replica stops generating."""

    def __init__(self, req: Request, chunks: AsyncIterator[bytes]) -> None:
        self._chunks = chunks
        self._watcher = asyncio.ensure_future(_until_disconnected(req.asgi_receive))

    def __aiter__(self) -> ClientStream:
        return self

    async def __anext__(self) -> bytes:
        if self._watcher.done():
            raise StopAsyncIteration  # the client went away
        return await self._chunks.__anext__()

    async def close(self) -> None:
        self._watcher.cancel()
        aclose = getattr(self._chunks, "aclose", None)
        if aclose is not None:
            await aclose()


async def _until_disconnected(receive: Callable[[], Coroutine[Any, Any, dict]]) -> None:
    """Returns when the client has disconnected (the request body has been read by then)."""
    with contextlib.suppress(Exception):
        while (await receive())["type"] != "http.disconnect":
            pass


async def relayed_chunks(upstream: Stream) -> AsyncIterator[bytes]:
    """A streamed answer's body as it comes, closed in the end (early: the replica stops generating)."""
    try:
        async for chunk in upstream.chunks():
            yield chunk
    except ReplicaUnreachable:
        logger.warning("stream from an inference replica broke off", exc_info=True)
        raise
    finally:
        upstream.close()


def upstream_error(upstream: Answer) -> ApiError:
    """A replica's error answer (standard envelope), to re-raise in this endpoint's envelope."""
    try:
        error = json.loads(upstream.data)["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        code, message = "upstream_error", f"The inference replica answered HTTP {upstream.status}"
    retry_after = upstream.headers.get("Retry-After")
    headers = {"Retry-After": retry_after} if retry_after else None
    return ApiError(message, status=falcon.code_to_http_status(upstream.status), code=code, headers=headers)


async def _relay_events(upstream: Stream, session_id: str | None) -> AsyncIterator[bytes]:
    """Copy the replica's stream; if the replica dies mid-stream, end with an error event."""
    chunks = relayed_chunks(upstream)
    try:
        async for chunk in chunks:
            yield chunk
    except ReplicaUnreachable:
        if session_id:
            yield sse_error("session_not_found", f"Its inference replica is gone. {SessionNotFound(session_id)}")
        else:
            yield sse_error("upstream_error", "The inference replica stopped answering; retry")
    finally:
        await chunks.aclose()
