"""Public errors and how they are rendered.

Every error a client may see is an ``ApiError`` (a ``falcon.HTTPError``) carrying a status,
a stable machine-readable ``code`` and a human message. A resource picks how its errors are
rendered with its ``error_envelope`` attribute:

- ``"v1"`` (the seed contract): HTTP 200 with ``{"ok": false, "traceback": message}``,
  because the original clients treat any non-2xx answer as a transport failure;
- ``"openai"`` (the OpenAI-compatible API): the real status with OpenAI's
  ``{"error": {"message", "type", "param", "code"}}``, so its clients raise the right exception;
- otherwise: the real status with ``{"ok": false, "error": {"code", "message"}}``.

Unexpected exceptions are logged with their stack under an incident id and answered with a
generic message naming it and the request id (and the stack only when the operator sets
``DEBUG_TRACEBACKS=1``): never a stack to the public.
"""

from __future__ import annotations

import logging
import traceback
import uuid
from typing import Any

import falcon

from services.common.web import request_id

logger = logging.getLogger(__name__)
ERROR_CODE_HEADER = "X-Petals-Chat-Error"
ERROR_STATUS_HEADER = "X-Petals-Chat-Status"  # the semantic status, also when v1 answers HTTP 200
MOVED_TO_HEADER = "X-Petals-Chat-Moved-To"  # where a handed-over session went (SessionMoved)


class ApiError(falcon.HTTPError):
    """An error answered to the client with a clear message."""

    http_status = falcon.HTTP_400
    error_code = "bad_request"

    def __init__(
        self,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        status: str | None = None,
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        self.error_code = code or self.error_code  # Falcon's HTTPError has a `code` of its own
        super().__init__(status or self.http_status, title=self.error_code, description=message, headers=headers)
        self.message = message
        self.param = param  # the request parameter at fault, when there is one

    def __str__(self) -> str:
        return self.message


class InvalidParameter(ApiError):
    """A request parameter has the wrong type, is out of range or is missing."""

    error_code = "invalid_parameter"


class PayloadTooLarge(ApiError):
    """The request body or an input is larger than the configured limit."""

    http_status = falcon.HTTP_413
    error_code = "payload_too_large"


class SessionNotFound(ApiError):
    """The session id is unknown, expired, or its replica is gone."""

    http_status = falcon.HTTP_404
    error_code = "session_not_found"

    def __init__(self, session_id: str, detail: str = "") -> None:
        # The original chat client matches /Session .+ expired/ to reopen and replay.
        message = f"Session {session_id} expired or does not exist"
        super().__init__(f"{detail} {message}".strip() if detail else message)


class ModelNotFound(ApiError):
    """The request names a model this deployment (or this replica) does not serve."""

    http_status = falcon.HTTP_404
    error_code = "model_not_found"

    def __init__(self, model: str, served: list[str], where: str = "here") -> None:
        listed = ", ".join(served) if served else "none yet"
        super().__init__(f"The model {model!r} is not served {where}; served: {listed}", param="model")


class ModelMismatch(InvalidParameter):
    """A request names a model other than the one its session belongs to."""

    error_code = "model_mismatch"

    def __init__(self, session_id: str, session_model: str, model: str) -> None:
        message = f"Session {session_id} belongs to the model {session_model!r}, not {model!r}"
        super().__init__(f"{message}: open a session of {model!r} for it", param="model")


class SessionFull(InvalidParameter):
    """The session has no room for the request's inputs and new tokens (the client may open a larger one)."""

    error_code = "session_full"


class SessionBusy(ApiError):
    """Another request is already generating in this session."""

    http_status = falcon.HTTP_409
    error_code = "session_busy"


class SessionMoved(ApiError):
    """The session was handed over to another replica (``MOVED_TO_HEADER`` names it): for the gateway,
    which follows it; never passed on to a client (services/common/api/handover.py)."""

    http_status = falcon.HTTP_421
    error_code = "session_moved"

    def __init__(self, session_id: str, replica: str) -> None:
        super().__init__(f"Session {session_id} moved to {replica}", headers={MOVED_TO_HEADER: replica})


class ServiceUnavailable(ApiError):
    """Temporarily unable to serve: model loading, swarm unreachable, at capacity."""

    http_status = falcon.HTTP_503
    error_code = "unavailable"

    def __init__(self, message: str, *, retry_after_s: int = 5) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class ModelStarting(ServiceUnavailable):
    """The model is configured (discovered) but no replica of it runs yet: one is being started
    (an autoscaler wakes the model on the gateway's ``requests_without_replica`` counter)."""

    error_code = "model_starting"

    def __init__(self, model: str, retry_after_s: int) -> None:
        message = f"The model {model!r} has no replica running yet; one is being started: retry in {retry_after_s} s"
        super().__init__(message, retry_after_s=retry_after_s)


class TooManySessions(ServiceUnavailable):
    """The replica already holds its maximum number of sessions."""

    error_code = "too_many_sessions"


class Unauthorized(ApiError):
    """API keys are on and the request brought none, or one that is not configured."""

    http_status = falcon.HTTP_401
    error_code = "invalid_api_key"


class SessionQuotaExceeded(ApiError):
    """The client already holds its quota of sessions on the replica, all of them busy."""

    http_status = falcon.HTTP_429
    error_code = "session_quota"


class ErrorEnvelopeMiddleware:
    """Notes the matched resource's ``error_envelope`` for error rendering."""

    def process_resource(self, req: falcon.Request, resp: falcon.Response, resource: Any, params: dict) -> None:
        req.context.error_envelope = getattr(resource, "error_envelope", "")

    async def process_resource_async(self, req: Any, resp: Any, resource: Any, params: dict) -> None:
        self.process_resource(req, resp, resource, params)


def render_error(req: falcon.Request, resp: falcon.Response, error: ApiError) -> None:
    """Write ``error`` in the envelope that the matched endpoint uses."""
    resp.status, resp.media = error_body(req.context.get("error_envelope", ""), error)
    for name, value in (error.headers or {}).items():
        resp.set_header(name, value)
    # Let the gateway act on errors, and count them, without parsing text.
    resp.set_header(ERROR_CODE_HEADER, error.error_code)
    resp.set_header(ERROR_STATUS_HEADER, error.status.split()[0])
    resp.context.error_status = error.status


def error_body(envelope: str, error: ApiError) -> tuple[str, dict[str, Any]]:
    """The HTTP status and JSON body of ``error`` in ``envelope`` (``"v1"``, ``"openai"`` or ``""``)."""
    if envelope == "v1":
        return falcon.HTTP_200, {"ok": False, "traceback": error.message}
    if envelope == "openai":
        return error.status, {"error": openai_error_body(error)}
    return error.status, {"ok": False, "error": {"code": error.error_code, "message": error.message}}


def openai_error_body(error: ApiError) -> dict[str, Any]:
    """An error as OpenAI's API writes it (``type`` is what its clients' docs refer to)."""
    status = int(error.status.split()[0])
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 429:
        kind = "rate_limit_error"
    return {"message": error.message, "type": kind, "param": error.param, "code": error.error_code}


def report_incident(error: BaseException, where: str) -> str:
    """Log an unexpected error with its stack under a new incident id; the message that tells the
    client (the incident and the request id, for the operators to find it in the logs)."""
    incident = uuid.uuid4().hex[:12]
    logger.error("unhandled error (incident %s) on %s", incident, where, exc_info=error)
    current = request_id.current()
    named = f"incident {incident}, request {current}" if current else f"incident {incident}"
    return f"Internal error ({named}); the operators can find it in the logs."


def make_error_handlers(debug_tracebacks: bool, *, asgi: bool = False):
    """Falcon error handlers for ApiError, Falcon's own HTTP errors and anything unexpected
    (coroutines for an ASGI app: Falcon requires them there)."""

    def handle_api_error(req: falcon.Request, resp: falcon.Response, error: ApiError, params: dict) -> None:
        render_error(req, resp, error)

    def handle_http_error(req: falcon.Request, resp: falcon.Response, error: falcon.HTTPError, params: dict) -> None:
        message = error.description or error.title or str(error.status)
        code = _slug(error.title or "http_error")
        render_error(req, resp, ApiError(message, status=error.status, code=code, headers=error.headers))

    def handle_unexpected(req: falcon.Request, resp: falcon.Response, error: Exception, params: dict) -> None:
        message = report_incident(error, f"{req.method} {req.path}")
        if debug_tracebacks:
            message += "\n" + "".join(traceback.format_exception(error))
        render_error(req, resp, ApiError(message, status=falcon.HTTP_500, code="internal_error"))

    def handle_bad_body(req: falcon.Request, resp: falcon.Response, error: Exception, params: dict) -> None:
        render_error(req, resp, ApiError(f"Malformed chunked request body: {error}", status=falcon.HTTP_400))

    handlers = [(Exception, handle_unexpected), (falcon.HTTPError, handle_http_error), (ApiError, handle_api_error)]
    if asgi:
        return [(exception, _asgi_handler(handler)) for exception, handler in handlers]
    return [*handlers, *((exception, handle_bad_body) for exception in _wsgi_body_errors())]


def _wsgi_body_errors() -> tuple[type[Exception], ...]:
    """gunicorn's errors for a malformed chunked body, raised while the app reads it: the client's fault."""
    from gunicorn.http.errors import ChunkMissingTerminator, InvalidChunkExtension, InvalidChunkSize

    return InvalidChunkSize, ChunkMissingTerminator, InvalidChunkExtension


def _asgi_handler(handler):
    """An ASGI error handler doing what ``handler`` does; on a WebSocket (an error before or during
    the handshake) it closes the connection as Falcon does, with 3000 + the HTTP status."""

    async def handle(req: Any, resp: Any, error: Exception, params: dict, ws: Any = None) -> None:
        if ws is not None:
            status = error.status if isinstance(error, falcon.HTTPError) else falcon.HTTP_500
            if not isinstance(error, falcon.HTTPError):
                logger.error("unhandled error on WebSocket %s", req.path, exc_info=error)
            await ws.close(3000 + int(str(status).split()[0]))
            return
        handler(req, resp, error, params)

    return handle


def _slug(title: str) -> str:
    return "_".join(title.lower().replace("-", " ").split())
