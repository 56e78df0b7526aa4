"""The v1 API (seed contract): ``generate`` and the session calls, relayed as whole answers."""

from __future__ import annotations

import falcon.asgi

from services.common.api.params import (
    get_model,
    get_session_id,
    parse_generate,
    parse_open_session,
    read_values_async,
)
from services.common.api.replica_request import GENERATE_PATH
from services.gateway.relay import Request, read_answer, relay
from services.gateway.routing import RoutedResource


class GenerateResource(RoutedResource):
    """``POST /api/v1/generate`` (seed contract)."""

    error_envelope = "v1"

    async def on_post(self, req: Request, resp: falcon.asgi.Response) -> None:
        params = parse_generate(await read_values_async(req, self._limits), self._limits)
        upstream = await self._router.generate(params, GENERATE_PATH, req.context.client.name)
        relay(resp, await read_answer(upstream))


class OpenSessionResource(RoutedResource):
    """``GET /api/v1/open_inference_session``: on the least-loaded ready replica of the model."""

    error_envelope = "v1"

    async def on_get(self, req: Request, resp: falcon.asgi.Response) -> None:
        values = await read_values_async(req, self._limits)
        max_length = parse_open_session(values, self._limits)
        relay(resp, await self._router.open_session(get_model(values), max_length, req.context.client.name))


class CloseSessionResource(RoutedResource):
    """``GET /api/v1/close_inference_session``: on the replica holding the session, if it is the client's."""

    error_envelope = "v1"

    async def on_get(self, req: Request, resp: falcon.asgi.Response) -> None:
        values = await read_values_async(req, self._limits)
        session_id = get_session_id(values, required=True)
        relay(resp, await self._router.close_session(session_id, get_model(values), req.context.client.name))
