"""``POST /api/v2/generate_stream``: a replica's Server-Sent Events, relayed to the client as they come."""

from __future__ import annotations

from collections.abc import AsyncIterator

import falcon.asgi

from services.common.api.params import parse_generate, read_values_async
from services.common.api.replica_request import GENERATE_STREAM_PATH
from services.common.web.errors import SessionNotFound
from services.common.web.sse import SSE_CONTENT_TYPE, SSE_HEADERS, sse_error
from services.gateway.relay import ClientStream, Request, read_answer, relay, relayed_chunks
from services.gateway.routing import RoutedResource
from services.gateway.upstream import ReplicaUnreachable, Stream


class GenerateStreamResource(RoutedResource):
    """``POST /api/v2/generate_stream``: the replica's Server-Sent Events, relayed as they come."""

    async def on_post(self, req: Request, resp: falcon.asgi.Response) -> None:
        params = parse_generate(await read_values_async(req, self._limits), self._limits)
        upstream = await self._router.generate(params, GENERATE_STREAM_PATH, req.context.client.name)
        if upstream.status != 200:
            relay(resp, await read_answer(upstream))  # the (small) error body
            return
        resp.content_type = SSE_CONTENT_TYPE
        resp.set_headers(SSE_HEADERS)
        resp.stream = ClientStream(req, _relay_events(upstream, params.session_id))


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
