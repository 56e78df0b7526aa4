"""A request id on every request, for matching log lines and error answers across services.

The gateway takes a client's ``X-Request-Id`` when it is safe to write in a log line (1-128
visible ASCII characters, no spaces), else makes one (a uuid4 in hex); it answers with it in the
``X-Request-Id`` header and sends it to the replicas on each call it makes for the request (see
services/gateway/upstream.py), which take it the same way. The id serves logging only: nothing
is decided by it (a client may send any id, a used one too).

While a request is served its id is the context's (``current()``): ``RequestIdFilter`` appends
it to every log line written meanwhile (access and error logs alike), and internal-error answers
name it (services/common/web/errors.py).
"""

from __future__ import annotations

import contextvars
import logging
import re
import uuid
from typing import Any

HEADER = "X-Request-Id"
MAX_CHARS = 128
_VALID = re.compile(rf"^[\x21-\x7e]{{1,{MAX_CHARS}}}$")  # visible ASCII: no space, no control character
_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


def new() -> str:
    """A fresh request id."""
    return uuid.uuid4().hex


def accept(value: str | None) -> str:
    """``value`` when it is a valid request id, else a fresh one."""
    return value if value is not None and _VALID.match(value) else new()


def current() -> str | None:
    """The id of the request being served in this context, if any."""
    return _current.get()


def begin(value: str | None) -> str:
    """Start serving a request that brings ``value`` (its ``X-Request-Id``): its id, now the context's."""
    request_id = accept(value)
    _current.set(request_id)
    return request_id


def end() -> None:
    """No request is served in this context any more (a thread that serves one request after another)."""
    _current.set(None)


def outgoing_headers() -> dict[str, str]:
    """The header that carries the current request's id on a call made for it (none outside a request)."""
    request_id = _current.get()
    return {HEADER: request_id} if request_id else {}


class RequestIdMiddleware:
    """Gives every request (WebSocket handshakes included) its id, ``req.context.request_id``, and
    answers with it in ``X-Request-Id`` (a WebSocket handshake's answer: see ``handshake_headers``)."""

    def process_request(self, req: Any, resp: Any) -> None:
        req.context.request_id = begin(req.get_header(HEADER))

    def process_response(self, req: Any, resp: Any, resource: Any, req_succeeded: bool) -> None:
        request_id = req.context.get("request_id")
        if request_id:
            resp.set_header(HEADER, request_id)

    async def process_request_async(self, req: Any, resp: Any) -> None:
        self.process_request(req, resp)

    async def process_response_async(self, req: Any, resp: Any, resource: Any, req_succeeded: bool) -> None:
        self.process_response(req, resp, resource, req_succeeded)

    async def process_request_ws(self, req: Any, ws: Any) -> None:
        self.process_request(req, None)


def handshake_headers(req: Any) -> dict[str, str]:
    """The headers a WebSocket handshake is accepted with: its request id."""
    return {HEADER: req.context.request_id}


class RequestIdFilter(logging.Filter):
    """Appends `` request_id=<id>`` to a line logged while a request is served (once per line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = _current.get()
        if request_id and getattr(record, "request_id", None) is None:
            record.request_id = request_id
            record.msg, record.args = f"{record.getMessage()} request_id={request_id}", ()
        return True


def install_log_filter() -> None:
    """Install ``RequestIdFilter`` on the root logger's handlers and on the servers' loggers (gunicorn,
    Uvicorn: their access and error lines), before any other filter that rewrites lines."""
    for name in ("gunicorn.error", "gunicorn.access", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).addFilter(RequestIdFilter())
    for handler in logging.getLogger().handlers:
        handler.addFilter(RequestIdFilter())
