"""uvicorn's httptools HTTP protocol with the limits gunicorn had: bounded request heads and a
deadline on reading them.

An event loop holds idle and slow connections for the price of a socket, not a thread, so none
of them holds up other clients. What uvicorn lacks is bounds: httptools accepts a request head
of any size (a client could make a worker buffer gigabytes of headers), a connection that sends
half a request head stays open for ever, and so does a new connection that sends nothing
(uvicorn's keep-alive timer only starts after a first response). Here, as gunicorn did for the
gateway before: a request line over ``MAX_REQUEST_LINE`` bytes is answered 414, more than
``MAX_HEADER_FIELDS`` header fields or one over ``MAX_HEADER_FIELD_BYTES`` 431, a head not
complete within ``HEAD_TIMEOUT_S`` seconds of its first byte is dropped, and a new connection
that sends nothing is closed after the keep-alive time, like an idle kept-alive one. And the app
is handed a request as soon as its head is complete, so that it can refuse a body declared too
large before any of it arrives.

Every answer the server gives by itself is JSON in the route's error shape
(services/common/web/protocol_errors.py), not uvicorn's plain text: a request httptools cannot
parse (bad request line, header or chunked encoding: 400), a head over the limits (414, 431),
and a refused WebSocket handshake (``WebSocketProtocol``: a bad upgrade request, 400 or 426; the
app closing before accepting, 403).

Both protocols override and read uvicorn's (and websockets') internals: fenced to uvicorn 0.54.0
and websockets 17.4 (``check``, run by the master as it reads services/gateway/gunicorn.conf.py;
docs/patches.md).
"""

from __future__ import annotations

import asyncio
from http import HTTPStatus
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.datastructures import Headers
from websockets.http11 import Response
from websockets.server import ServerProtocol

from services.common.startup.patching import require_methods, require_version
from services.common.web.protocol_errors import PEEK_BYTES, error_json, error_response

PATCH = "http_protocol"
PATCHED_VERSIONS = {"uvicorn": "0.54.0", "websockets": "17.4"}
# What HttpProtocol overrides or calls of HttpToolsProtocol, and how it calls them.
OVERRIDDEN = {
    "connection_made": ("self", "transport"),
    "connection_lost": ("self", "exc"),
    "on_message_begin": ("self",),
    "on_url": ("self", "url"),
    "on_header": ("self", "name", "value"),
    "on_headers_complete": ("self",),
    "send_400_response": ("self", "msg"),
    "timeout_keep_alive_handler": ("self",),
}
MAX_REQUEST_LINE = 4094  # gunicorn's limit_request_line default (the URL's bytes here)
MAX_HEADER_FIELDS = 100  # gunicorn's limit_request_fields default
MAX_HEADER_FIELD_BYTES = 8190  # gunicorn's limit_request_field_size default (name and value)
HEAD_TIMEOUT_S = 5.0


def check() -> None:
    """Raise PatchError unless uvicorn's httptools protocol and websockets' server side are the
    ones these protocols were written against."""
    for dist, version in PATCHED_VERSIONS.items():
        require_version(dist, version, PATCH)
    require_methods(HttpToolsProtocol, OVERRIDDEN, PATCH)
    require_methods(ServerProtocol, {"reject": ("self", "status", "text")}, PATCH)
    require_methods(WebSocketsSansIOProtocol, {"__init__": ("self", "config", "server_state", "app_state")}, PATCH)


class _Refused(Exception):
    """Raised in a parser callback: answer ``status`` with ``message`` and close."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class HttpProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` with bounded request heads and a deadline on reading them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._url_bytes = 0
        self._header_fields = 0
        self._url_start = b""  # the URL's first bytes: its path picks the error shape
        self._refusal: _Refused | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # Idle until its first byte: closed after the keep-alive time (data_received cancels it).
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    # parser callbacks ---------------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._url_bytes = self._header_fields = 0
        self._url_start = b""
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(HEAD_TIMEOUT_S, self._head_overdue)

    def on_url(self, url: bytes) -> None:
        self._url_bytes += len(url)
        self._url_start += url[: max(PEEK_BYTES - len(self._url_start), 0)]
        if self._url_bytes > MAX_REQUEST_LINE:
            self._refuse(414, f"Request line too long: the URL may have at most {MAX_REQUEST_LINE} bytes")
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_fields += 1
        if self._header_fields > MAX_HEADER_FIELDS:
            self._refuse(431, f"Too many header fields: at most {MAX_HEADER_FIELDS}")
        if len(name) + len(value) > MAX_HEADER_FIELD_BYTES:
            self._refuse(431, f"Header field too large: at most {MAX_HEADER_FIELD_BYTES} bytes")
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._cancel_head_timer()
        if self.parser.get_http_version() not in ("1.0", "1.1"):  # HTTP/0.9's "GET /": the app takes none
            self._refuse(400, "Invalid HTTP version: HTTP/1.0 or HTTP/1.1 requests only")
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle.scope is self.scope and cycle.more_body:
            # The app sees the request once its head is complete (an empty first body chunk), not
            # only when body bytes arrive: a body declared too large is refused without waiting
            # for bytes that may never come.
            cycle.message_event.set()

    # answers ------------------------------------------------------------------------
    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request it cannot parse, and ours to a head over the limits, as JSON."""
        refusal, self._refusal = self._refusal, None
        status, message = (refusal.status, str(refusal)) if refusal else (400, msg)
        path = self._url_start.partition(b"?")[0].decode("latin-1") or None
        self.transport.write(error_response(status, message, path))
        self.transport.close()

    def _refuse(self, status: int, message: str) -> None:
        self._refusal = _Refused(status, message)
        raise self._refusal  # httptools stops parsing; uvicorn then calls send_400_response

    def _head_overdue(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None


class _JsonRefusals(ServerProtocol):
    """websockets' server side whose handshake refusals carry a JSON body (the default error shape)."""

    def reject(self, status: Any, text: str) -> Response:
        response = super().reject(status, text)
        code = HTTPStatus(status).value
        _, headers, body = error_json(code, text or "WebSocket connection refused", None)
        kept = [(name, value) for name, value in response.headers.raw_items() if name.lower() not in _REPLACED]
        return Response(code, HTTPStatus(code).phrase, Headers([*kept, *headers]), body)


_REPLACED = {"content-type", "content-length"}


class WebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O WebSocket protocol, refusing handshakes with JSON."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conn.__class__ = _JsonRefusals  # uvicorn builds a plain ServerProtocol; this only adds reject()
