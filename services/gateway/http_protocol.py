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
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

MAX_REQUEST_LINE = 4094  # gunicorn's limit_request_line default (the URL's bytes here)
MAX_HEADER_FIELDS = 100  # gunicorn's limit_request_fields default
MAX_HEADER_FIELD_BYTES = 8190  # gunicorn's limit_request_field_size default (name and value)
HEAD_TIMEOUT_S = 5.0


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
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(HEAD_TIMEOUT_S, self._head_overdue)

    def on_url(self, url: bytes) -> None:
        self._url_bytes += len(url)
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
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle.scope is self.scope and cycle.more_body:
            # The app sees the request once its head is complete (an empty first body chunk), not
            # only when body bytes arrive: a body declared too large is refused without waiting
            # for bytes that may never come.
            cycle.message_event.set()

    # answers ------------------------------------------------------------------------
    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request it cannot parse; a refusal of ours has its own status."""
        refusal, self._refusal = self._refusal, None
        if refusal is None:
            super().send_400_response(msg)
            return
        body = str(refusal).encode("ascii")
        content = [STATUS_LINE[refusal.status]]
        content += [b"content-type: text/plain; charset=utf-8\r\n", b"content-length: %d\r\n" % len(body)]
        content += [b"connection: close\r\n", b"\r\n", body]
        self.transport.write(b"".join(content))
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
