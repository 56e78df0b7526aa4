"""Relaying replicas' answers to clients: the ASGI request class, answer and stream relays, and the
client-disconnect watcher that stops a relayed stream."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import falcon
import falcon.asgi

from services.common.web.errors import ERROR_CODE_HEADER, ERROR_STATUS_HEADER, ApiError, ServiceUnavailable
from services.gateway.upstream import ReplicaAnswer, ReplicaUnreachable, Stream

logger = logging.getLogger(__name__)


class Request(falcon.asgi.Request):
    """Falcon's ASGI request, keeping the ASGI ``receive`` callable: a relayed stream watches it
    for the client going away (the server's ``send`` does nothing once it has)."""

    def __init__(self, scope: dict, receive: Callable[[], Coroutine[Any, Any, dict]], *args: Any, **kwargs: Any):
        super().__init__(scope, receive, *args, **kwargs)
        self.asgi_receive = receive


async def read_answer(upstream: Stream) -> ReplicaAnswer:
    """A replica's whole answer; breaking off while sending it is a 503."""
    try:
        return await upstream.read()
    except ReplicaUnreachable as error:
        raise ServiceUnavailable(f"Inference replica {error.replica} failed ({error.kind})") from error


def relay(resp: falcon.asgi.Response, upstream: ReplicaAnswer) -> None:
    """Answer with a replica's (already read) response."""
    resp.status = upstream.status
    resp.content_type = upstream.headers.get("Content-Type", falcon.MEDIA_JSON)
    resp.data = upstream.data
    for header in (ERROR_CODE_HEADER, ERROR_STATUS_HEADER, "Retry-After"):
        if header in upstream.headers:
            resp.set_header(header, upstream.headers[header])
    if ERROR_STATUS_HEADER in upstream.headers:
        resp.context.error_status = upstream.headers[ERROR_STATUS_HEADER]


def upstream_error(upstream: ReplicaAnswer) -> ApiError:
    """A replica's error answer (standard envelope), to re-raise in this endpoint's envelope."""
    try:
        error = json.loads(upstream.data)["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        code, message = "upstream_error", f"The inference replica answered HTTP {upstream.status}"
    retry_after = upstream.headers.get("Retry-After")
    headers = {"Retry-After": retry_after} if retry_after else None
    return ApiError(message, status=falcon.code_to_http_status(upstream.status), code=code, headers=headers)


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
