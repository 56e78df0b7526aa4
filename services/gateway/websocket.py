"""``/api/v2/generate``: the WebSocket API of chat.petals.dev, relayed to an inference replica.

The messages are in socket_protocol.py. Here, the relay: a connection's ``open_inference_session``
opens a v1 session on a replica of its model, chosen by the routing policy like any new session
(replicas.py); a ``generate`` message is one typed ``StepsRequest`` to that session's replica, which
runs its steps (the step rule, services/common/api/step_rule.py) and streams back the messages to send
over its SSE endpoint, so the replica needs no WebSocket of its own. The session is the connection's: it is
closed on the replica as soon as the connection ends, whether the client closed it, vanished (no
answer to pings), idled past ``WS_IDLE_TIMEOUT_SECONDS`` or the gateway is stopping; a generation
still running then is cancelled first (its stream to the replica is dropped, which stops it at
its next token).

Each connection is a coroutine and one pending read on the worker's event loop: thousands of
open chats cost no thread. Messages keep being read while an answer is generated, so a message
that arrives meanwhile is answered with an error at once (and pings are answered). Errors that
concern a message leave the connection open; one that ends the session (it expired, its replica
is gone, the swarm lost it) is answered and then the connection is closed (code 1011). One client
(``ClientIdentity.name``) holds at most ``WS_MAX_CONNECTIONS_PER_CLIENT`` of a worker's
connections: one more is answered with an error message and closed (code 1013, try again later).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

import falcon
import falcon.asgi
from falcon.errors import PayloadTypeError, WebSocketDisconnected

from services.common.api.replica_request import GENERATE_STREAM_PATH, ReplicaRequest
from services.common.api.step_rule import StepsRequest
from services.common.web.errors import (
    ERROR_CODE_HEADER,
    ERROR_STATUS_HEADER,
    ApiError,
    ServiceUnavailable,
    SessionNotFound,
    Unauthorized,
    report_incident,
)
from services.common.web.metrics import REQUEST_DURATION, REQUESTS
from services.common.web.request_id import handshake_headers
from services.common.web.sse import parse_sse_async
from services.gateway.auth import POLICY_VIOLATION, accepted_subprotocol
from services.gateway.metrics import CLIENT_REQUESTS, WEBSOCKET_CONNECTIONS
from services.gateway.ratelimit import RateLimitMiddleware
from services.gateway.relay import Request, read_answer, relayed_chunks, upstream_error
from services.gateway.routing import Router
from services.gateway.settings import GatewaySettings
from services.gateway.socket_protocol import (
    OPEN,
    Generate,
    parse_generate_message,
    parse_message,
    parse_open,
)
from services.gateway.upstream import ReplicaUnreachable

logger = logging.getLogger(__name__)
ENDPOINT = "/api/v2/generate"
_SESSION_LOST = 1011  # close code after an error that ended the session
_TRY_AGAIN_LATER = 1013  # close code of a connection over its client's WS_MAX_CONNECTIONS_PER_CLIENT
_BUSY = "A generation is running on this connection: send the next message after its last answer (stop: true)"


class GenerateSocketResource:
    """``/api/v2/generate``: WebSocket connections (a plain HTTP GET gets 426 Upgrade Required)."""

    def __init__(self, router: Router, settings: GatewaySettings, rate_limit: RateLimitMiddleware | None) -> None:
        self._router = router
        self._settings = settings
        self._rate_limit = rate_limit
        origins = settings.cors_allow_origins
        self._origins = None if "*" in origins else set(origins)
        self._per_client = ConnectionsPerClient(settings.ws_max_connections_per_client)

    async def on_get(self, req: Request, resp: falcon.asgi.Response) -> None:
        resp.status = falcon.HTTP_426
        resp.set_header("Upgrade", "websocket")
        resp.set_header("Connection", "Upgrade")
        resp.context.error_status = "426"
        resp.media = {
            "ok": False,
            "error": {"code": "upgrade_required", "message": "This endpoint speaks WebSocket: connect with ws://"},
        }

    async def on_websocket(self, req: Request, ws: falcon.asgi.WebSocket) -> None:
        origin = req.get_header("Origin")
        if self._origins is not None and origin is not None and origin not in self._origins:
            await ws.close()  # before the handshake: HTTP 403 (CORS_ALLOW_ORIGINS)
            return
        await ws.accept(subprotocol=accepted_subprotocol(req), headers=handshake_headers(req))
        client = req.context.client.name
        if not self._per_client.open(client):
            await self._refuse(ws)
            return
        WEBSOCKET_CONNECTIONS.inc()
        connection = _Connection(self._router, self._settings, self._rate_limit, req, ws)
        try:
            await connection.serve()
        finally:
            self._per_client.close(client)
            WEBSOCKET_CONNECTIONS.dec()
            await connection.close_session()

    async def _refuse(self, ws: falcon.asgi.WebSocket) -> None:
        """The protocol's error message, then close 1013: the client is at its connection limit."""
        limit = self._per_client.limit
        text = f"This client already holds {limit} connections (WS_MAX_CONNECTIONS_PER_CLIENT): close one first"
        with contextlib.suppress(WebSocketDisconnected):
            await ws.send_text(json.dumps({"ok": False, "traceback": text}))
            await ws.close(_TRY_AGAIN_LATER, "too many connections")


class ConnectionsPerClient:
    """Open connections per client in this worker, at most ``limit`` each (0: no limit)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[str, int] = {}

    def open(self, client: str) -> bool:
        """Count a new connection of ``client``; False (not counted) when it is at its limit."""
        count = self._open.get(client, 0)
        if self.limit and count >= self.limit:
            return False
        self._open[client] = count + 1
        return True

    def close(self, client: str) -> None:
        count = self._open.pop(client, 1) - 1
        if count > 0:
            self._open[client] = count


class _Connection:
    """One client's connection and the session it holds."""

    def __init__(
        self,
        router: Router,
        settings: GatewaySettings,
        rate_limit: RateLimitMiddleware | None,
        req: Request,
        ws: falcon.asgi.WebSocket,
    ) -> None:
        self._router = router
        self._limits = settings.limits
        self._keys = settings.api_keys
        self._idle_timeout_s = settings.ws_idle_timeout_s
        self._max_message_bytes = settings.ws_max_message_bytes
        self._rate_limit = rate_limit
        self._req = req
        self._ws = ws
        self._session_id: str | None = None
        self._max_length = 0
        self._continue_with: str | None = None  # an extra stop sequence ended the last answer: this token next
        self._client = req.context.client.name  # the owner of the connection's session

    async def serve(self) -> None:
        """Read messages until the connection ends; at most one generation runs at a time."""
        receiving: asyncio.Future = asyncio.ensure_future(self._receive())
        generation: asyncio.Task | None = None
        try:
            while True:
                waiting = {receiving} if generation is None else {receiving, generation}
                timeout = self._idle_timeout_s if generation is None else None
                done, _ = await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    idle = f"No message for {self._idle_timeout_s:g} s: closing the connection and its session"
                    await self._send_error(ApiError(f"{idle} (WS_IDLE_TIMEOUT_SECONDS)"))
                    await self._ws.close(1000, "idle timeout")
                    return
                if generation is not None and generation.done():
                    ended_session, generation = generation.result(), None
                    if ended_session:
                        await self._ws.close(_SESSION_LOST, "session lost")
                        return
                if receiving.done():
                    data = receiving.result()  # WebSocketDisconnected: the client has gone
                    if self._key_removed():
                        await self._send_error(Unauthorized("The API key of this connection is no longer valid"))
                        await self._ws.close(POLICY_VIOLATION, "API key removed")
                        return
                    receiving = asyncio.ensure_future(self._receive())
                    if generation is not None:
                        await self._send_error(ApiError(_BUSY, status=falcon.HTTP_409, code="session_busy"))
                    else:
                        generation = await self._handle(data)
        except WebSocketDisconnected:
            pass
        finally:
            for task in (receiving, generation):
                if task is not None and not task.done():
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task

    def _key_removed(self) -> bool:
        """Whether the connection's API key was removed since the handshake (a rotated key file)."""
        key_id = self._req.context.client.key_id
        return key_id is not None and key_id not in self._keys.current().ids

    async def _receive(self) -> str | bytes:
        try:
            return await self._ws.receive_text()
        except PayloadTypeError:
            return b""  # a binary message (its content does not matter)

    async def _handle(self, data: str | bytes) -> asyncio.Task | None:
        """Answer a message; a generation goes on in a task (returned)."""
        started = time.perf_counter()
        try:
            message = parse_message(data, self._max_message_bytes)
            if message["type"] == OPEN:
                await self._open(message)
                self._count("200", started)
                return None
            if self._session_id is None:
                raise ApiError('Open a session first: {"type": "open_inference_session", "max_length": N}')
            if self._rate_limit is not None:
                self._rate_limit.check(self._req)
            request = parse_generate_message(message, self._session_id, self._limits)
        except ApiError as error:
            await self._send_error(error)
            self._count(error.status, started)
            return None
        return asyncio.create_task(self._generate(request, started))

    async def _open(self, message: dict[str, Any]) -> None:
        if self._session_id is not None:
            raise ApiError("This connection already holds a session: open another connection for another session")
        request = parse_open(message, self._limits)
        answer = await self._router.open_session(request.model, request.max_length, self._client)
        body = _json(answer.data)
        if not body.get("ok"):
            status = falcon.code_to_http_status(answer.headers.get(ERROR_STATUS_HEADER, "400"))
            raise ApiError(str(body.get("traceback", "The session could not be opened")), status=status,
                           code=answer.headers.get(ERROR_CODE_HEADER))  # fmt: skip
        self._session_id, self._max_length = str(body["session_id"]), request.max_length
        await self._send({"ok": True})

    async def _generate(self, request: Generate, started: float) -> bool:
        """Relay one ``generate`` message's answer from the replica; True if an error ended the session."""
        try:
            done = await self._relay_steps(request)
            self._continue_with = request.stops.sequence if done["ended_by_extra"] else None
            await self._send(done["message"])  # the last await: the next message finds no generation running
            self._count("200", started)
            return False
        except ApiError as error:
            await self._send_error(error)
            self._count(error.status, started)
            return error.error_code == SessionNotFound.error_code
        except (WebSocketDisconnected, asyncio.CancelledError):
            raise
        except Exception as error:
            await self._send_error(error)
            self._count("500", started)
            return False

    async def _relay_steps(self, request: Generate) -> dict[str, Any]:
        """Run the message's steps on the session's replica, sending each message but the last as it
        comes; the ``done`` event: the last message and whether an extra stop sequence ended the answer
        (errors raised as ApiError)."""
        assert self._session_id is not None
        first = ReplicaRequest(request.params, replace_last_token=self._continue_with, client=self._client)
        body = StepsRequest(first, request.stops, self._max_length).to_json()
        upstream = await self._router.to_session(self._session_id, request.params.model, "POST",
                                                 GENERATE_STREAM_PATH, json_body=body)  # fmt: skip
        if upstream.status != 200:
            raise upstream_error(await read_answer(upstream))
        self._continue_with = None  # the first step has replaced the session's last token
        chunks = relayed_chunks(upstream)
        try:
            async for event, data in parse_sse_async(chunks):
                if event == "message":
                    await self._send(data)
                elif event == "done":
                    return data
                elif event == "error":
                    error = data.get("error", {})
                    raise ApiError(str(error.get("message", "Generation failed")), status=falcon.HTTP_502,
                                   code=str(error.get("code", "upstream_error")))  # fmt: skip
        except ReplicaUnreachable as error:
            raise SessionNotFound(self._session_id, detail="Its inference replica stopped answering.") from error
        finally:
            await chunks.aclose()
        raise ServiceUnavailable("The inference replica ended the answer early; retry")

    async def close_session(self) -> None:
        """Close the connection's session on its replica (shielded: it runs even while the
        connection's task is being cancelled)."""
        if self._session_id is None:
            return
        session_id, self._session_id = self._session_id, None
        closing = asyncio.ensure_future(self._close_on_replica(session_id))
        with contextlib.suppress(BaseException):
            await asyncio.shield(closing)

    async def _close_on_replica(self, session_id: str) -> None:
        try:
            await self._router.close_session(session_id, None, self._client)
        except ApiError:
            pass  # gone already (expired, or its replica is): nothing to free
        except Exception:
            logger.warning("closing session %s failed", session_id, exc_info=True)

    async def _send(self, message: dict[str, Any]) -> None:
        await self._ws.send_text(json.dumps(message, ensure_ascii=False))

    async def _send_error(self, error: Exception) -> None:
        text = error.message if isinstance(error, ApiError) else report_incident(error, ENDPOINT)
        await self._send({"ok": False, "traceback": text})

    def _count(self, status: str, started: float) -> None:
        code = str(status).split()[0]
        REQUESTS.labels(endpoint=ENDPOINT, status=code).inc()
        REQUEST_DURATION.labels(endpoint=ENDPOINT).observe(time.perf_counter() - started)
        CLIENT_REQUESTS.labels(key_id=self._req.context.client.label, status=code).inc()


def _json(data: bytes) -> dict[str, Any]:
    try:
        body = json.loads(data)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise ServiceUnavailable("The inference replica sent an unreadable answer; retry")
    return body
