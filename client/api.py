"""The one client of the public API that tests and benchmarks share: v1, the SSE stream, the WebSocket API.

``Api`` speaks v1 and v2's Server-Sent Events (parsed by ``services.common.web.sse``, the parser the
gateway relays with) over the standard library's ``http.client``: a lean client, so benchmark
figures show what the services add rather than what a heavier HTTP library costs (about 1.2 ms
per call for ``requests`` on this machine). One keep-alive connection per thread. The WebSocket
helpers use the ``websockets`` library, blocking (``connect_ws``) or on an event loop (``connect_ws_async``).
"""

from __future__ import annotations

import http.client
import json
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from websockets.asyncio.client import ClientConnection as AsyncConnection
from websockets.asyncio.client import connect as connect_async
from websockets.sync.client import ClientConnection, connect

from services.common.web.sse import parse_sse

Event = tuple[str, dict[str, Any]]
_FORM = {"Content-Type": "application/x-www-form-urlencoded"}
_JSON = {"Content-Type": "application/json"}
_STALE = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)  # a kept-alive connection closed


class CallFailed(Exception):
    """A v1 call that did not answer ``ok: true`` (or no answer at all)."""


class Api:
    """The v1 API and the SSE stream of a service (an inference replica or the gateway)."""

    def __init__(self, base_url: str, timeout_s: float = 60.0, headers: dict[str, str] | None = None) -> None:
        self.base_url = base_url
        self._headers = headers or {}  # sent with every request (e.g. an API key)
        parsed = urllib.parse.urlsplit(base_url)
        self._address = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self._timeout_s = timeout_s
        self._local = threading.local()

    # v1 ---------------------------------------------------------------------------------
    def answer(self, method: str, endpoint: str, fields: dict[str, Any]) -> dict[str, Any]:
        """One v1 call (GET: a query string; POST: a form body); its answer, ``ok`` or not. v1
        answers application errors with HTTP 200: any other status, or no answer, raises CallFailed."""
        query = urllib.parse.urlencode(fields)
        try:
            if method == "GET":
                status, body = self.request("GET", f"/api/v1/{endpoint}?{query}")
            else:
                status, body = self.request("POST", f"/api/v1/{endpoint}", query.encode(), _FORM)
        except (OSError, http.client.HTTPException) as error:
            raise CallFailed(f"{endpoint}: {type(error).__name__}: {error}") from error
        if status != 200:
            raise CallFailed(f"{endpoint}: HTTP {status}: {body[:200]!r}")
        return json.loads(body)

    def call(self, method: str, endpoint: str, fields: dict[str, Any]) -> dict[str, Any]:
        """``answer``, raising CallFailed unless it is ``ok: true``."""
        answer = self.answer(method, endpoint, fields)
        if not answer.get("ok"):
            raise CallFailed(f"{endpoint}: {answer.get('traceback') or answer}")
        return answer

    def generate(self, **fields: Any) -> dict[str, Any]:
        """``POST /api/v1/generate``: the answer, ``{"ok": true, "outputs"}`` or ``{"ok": false, "traceback"}``."""
        return self.answer("POST", "generate", fields)

    def open_session(self, max_length: int, **fields: Any) -> str:
        """A new session's id."""
        return self.call("GET", "open_inference_session", {"max_length": max_length, **fields})["session_id"]

    def close_session(self, session_id: str) -> dict[str, Any]:
        return self.answer("GET", "close_inference_session", {"session_id": session_id})

    def metrics(self) -> str:
        """The service's Prometheus text."""
        return self.request("GET", "/metrics")[1].decode()

    # v2: Server-Sent Events ---------------------------------------------------------------
    def events(self, body: dict[str, Any]) -> tuple[int, Iterator[Event]]:
        """``POST /api/v2/generate_stream``: the status and the (event, data) messages as they come;
        a JSON answer (an error before the stream started) is one ``("json", body)`` message.
        Read the messages to the end before the next call of this thread."""
        response = self._send("POST", "/api/v2/generate_stream", json.dumps(body).encode(), _JSON)
        if response.getheader("Content-Type", "").startswith("application/json"):
            return response.status, iter([("json", json.loads(response.read()))])
        return response.status, parse_sse(_chunks(response))

    def stream(self, body: dict[str, Any]) -> tuple[int, list[Event]]:
        """``events``, all of them."""
        status, events = self.events(body)
        return status, list(events)

    def stream_text(self, body: dict[str, Any], on_token: Callable[[int], None] = lambda count: None) -> dict:
        """A stream that must succeed: ``on_token(generated tokens)`` per token; the final ``done``
        or ``error`` message, its name under ``"event"``."""
        status, events = self.events(body)
        for event, data in events:
            if status != 200:
                raise CallFailed(f"HTTP {status}: {data}")
            if event == "token":
                on_token(data["generated_tokens"])
            else:
                return {"event": event, **data}
        raise CallFailed("the stream ended without a done or error event")

    # HTTP -------------------------------------------------------------------------------
    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> tuple:
        """(status, body bytes) of one request."""
        response = self._send(method, path, body, headers or {})
        return response.status, response.read()

    def close(self) -> None:
        """Close this thread's connection."""
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            connection.close()
            self._local.connection = None

    def _send(self, method: str, path: str, body: bytes | None, headers: dict) -> http.client.HTTPResponse:
        headers = {**self._headers, **headers}
        connection, reused = self._connection()
        try:
            connection.request(method, path, body=body, headers=headers)
            return connection.getresponse()
        except _STALE:
            self.close()
            if not reused:
                raise
        except (OSError, http.client.HTTPException):
            self.close()
            raise
        connection, _ = self._connection()  # the server had closed the idle connection: once more
        connection.request(method, path, body=body, headers=headers)
        return connection.getresponse()

    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            return connection, True
        self._local.connection = http.client.HTTPConnection(*self._address, timeout=self._timeout_s)
        return self._local.connection, False


def session_cycles(
    base_url: str, first: int, count: int, threads: int, max_length: int, timeout_s: float = 60.0
) -> None:
    """Cycles ``first`` to ``first + count``: open a session, generate 1 or 2 tokens greedily (odd and
    even cycles), close it; spread over ``threads`` keep-alive clients (the leak test, bench.memory)."""

    def worker(indices: range) -> None:
        client = Api(base_url, timeout_s=timeout_s)
        try:
            for index in indices:
                session_id = client.open_session(max_length)
                fields = {"inputs": f"Cycle {index}", "do_sample": 0, "session_id": session_id}
                client.call("POST", "generate", {**fields, "max_new_tokens": 1 + index % 2})
                client.call("GET", "close_inference_session", {"session_id": session_id})
        finally:
            client.close()

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(worker, [range(first + t, first + count, threads) for t in range(threads)]))


def _chunks(response: http.client.HTTPResponse) -> Iterator[bytes]:
    while chunk := response.read1(65536):
        yield chunk


# The WebSocket API ------------------------------------------------------------------------
def ws_url(port: int, query: str = "", host: str = "127.0.0.1") -> str:
    return f"ws://{host}:{port}/api/v2/generate{query}"


def connect_ws(port: int, query: str = "", host: str = "127.0.0.1", **kwargs: Any) -> ClientConnection:
    """A blocking connection to the gateway's WebSocket API (``query``: e.g. ``?api_key=...``)."""
    return connect(ws_url(port, query, host), proxy=None, compression=None, open_timeout=10, **kwargs)


def ask(ws: ClientConnection, message: dict | str, timeout: float = 60) -> dict:
    """Send one message (a dict as JSON, a str as it is); the next answer."""
    ws.send(message if isinstance(message, str) else json.dumps(message))
    return json.loads(ws.recv(timeout=timeout))


def answers(ws: ClientConnection, timeout: float = 120) -> list[dict]:
    """Messages until one with stop: true (or an error)."""
    received = []
    while True:
        received.append(json.loads(ws.recv(timeout=timeout)))
        if not received[-1]["ok"] or received[-1]["stop"]:
            return received


async def connect_ws_async(port: int) -> AsyncConnection:
    """A connection on the event loop (for benchmarks holding thousands): no pings, no size limit."""
    return await connect_async(ws_url(port), compression=None, proxy=None, ping_interval=None, open_timeout=60,
                               max_size=None)  # fmt: skip


async def ask_async(ws: AsyncConnection, message: dict) -> dict:
    await ws.send(json.dumps(message))
    return json.loads(await ws.recv())
