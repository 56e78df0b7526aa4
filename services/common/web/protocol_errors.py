"""The answers the HTTP servers give by themselves, in the API's JSON error shapes.

gunicorn (inference) and uvicorn with httptools and websockets (gateway) answer a request no
app sees (a malformed request line, header or chunked body, a head over the limits, a refused
WebSocket handshake) with an HTML or plain-text page of their own; the workers write this
instead. The shape follows the path as the routes' ``error_envelope`` does (the unit tests check
that they agree): ``/api/v1/`` the v1 shape (HTTP 200, the real status in
``X-Petals-Chat-Status``), ``/v1/`` OpenAI's, anything else the default
``{"ok": false, "error": {"code", "message"}}``, which is also the shape when the path is unknown
(the request line itself is the fault).
"""

from __future__ import annotations

import json

import falcon

from services.common.web.errors import ERROR_CODE_HEADER, ERROR_STATUS_HEADER, ApiError, error_body

ENVELOPE_PREFIXES = (("/api/v1/", "v1"), ("/v1/", "openai"))
PEEK_BYTES = 64  # of a request's URL: enough to tell its route's error shape
MAX_MESSAGE_CHARS = 300  # a message may quote the client's bytes: no more than this


def envelope_of(path: str | None) -> str:
    """The error envelope of the routes under ``path`` (``""``: the default one)."""
    return next((envelope for prefix, envelope in ENVELOPE_PREFIXES if (path or "").startswith(prefix)), "")


def status_code(status: int) -> str:
    """A stable code for a protocol-level status: its reason phrase as a slug (``uri_too_long``)."""
    return "_".join(falcon.code_to_http_status(status).split(" ", 1)[1].lower().replace("-", " ").split())


def error_json(status: int, message: str, path: str | None) -> tuple[int, list[tuple[str, str]], bytes]:
    """The status, headers and body answering a request the server refused with ``status``."""
    message = message if len(message) <= MAX_MESSAGE_CHARS else message[: MAX_MESSAGE_CHARS - 3] + "..."
    error = ApiError(message, status=falcon.code_to_http_status(status), code=status_code(status))
    http_status, body = error_body(envelope_of(path), error)
    data = json.dumps(body).encode()
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(data))),
               (ERROR_CODE_HEADER, error.error_code), (ERROR_STATUS_HEADER, str(status))]  # fmt: skip
    return int(http_status.split()[0]), headers, data


def error_response(status: int, message: str, path: str | None) -> bytes:
    """A whole HTTP/1.1 response (the connection closes after it) refusing a request with ``status``."""
    code, headers, body = error_json(status, message, path)
    lines = [f"HTTP/1.1 {falcon.code_to_http_status(code)}", *(f"{name}: {value}" for name, value in headers)]
    return ("\r\n".join([*lines, "Connection: close", "", ""])).encode("latin-1") + body
