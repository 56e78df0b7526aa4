"""Assembly of a Falcon app with what every service shares.

Each service builds its app with ``create_app``: a request id on every request
(services/common/web/request_id.py), JSON errors in the right envelope, request metrics, ``/metrics``,
``/healthz`` and ``/readyz``, security headers on every response (a Content-Security-Policy, the
API's by default: nothing may be loaded, run or framed from an answer; the ui passes the page's).
Services add their own routes after.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import falcon
import falcon.asgi

from services.common.web.errors import ErrorEnvelopeMiddleware, make_error_handlers
from services.common.web.metrics import AsyncMetricsResource, MetricsResource, RequestMetricsMiddleware
from services.common.web.request_id import RequestIdMiddleware, install_log_filter

ReadinessCheck = Callable[[], tuple[bool, dict]]
API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
SECURITY_HEADERS = ("Content-Security-Policy", "X-Content-Type-Options", "Referrer-Policy", "X-Frame-Options")


class SecurityHeadersMiddleware:
    """Sets the security headers on every response that does not set its own (a page relayed from
    the ui keeps the ui's): CSP, ``nosniff``, no referrer, no framing."""

    def __init__(self, content_security_policy: str) -> None:
        values = (content_security_policy, "nosniff", "no-referrer", "DENY")
        self._headers = dict(zip(SECURITY_HEADERS, values, strict=True))

    def process_response(self, req: falcon.Request, resp: falcon.Response, resource, req_succeeded: bool) -> None:
        for name, value in self._headers.items():
            if resp.get_header(name) is None:
                resp.set_header(name, value)

    async def process_response_async(self, req, resp, resource, req_succeeded: bool) -> None:
        self.process_response(req, resp, resource, req_succeeded)


class HealthResource:
    """``GET /healthz``: the process is alive and serving HTTP."""

    public = True  # open to everyone, also when the gateway wants API keys (services/gateway/auth.py)

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"ok": True}


class ReadinessResource:
    """``GET /readyz``: 200 when the service can do its job, 503 otherwise; the body says why."""

    public = True

    def __init__(self, check: ReadinessCheck) -> None:
        self._check = check

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        ready, info = self._check()
        resp.status = falcon.HTTP_200 if ready else falcon.HTTP_503
        resp.media = {"ok": ready, **info}


class AsyncHealthResource:
    """``GET /healthz`` in an ASGI app."""

    public = True

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        resp.media = {"ok": True}


class AsyncReadinessResource(ReadinessResource):
    """``GET /readyz`` in an ASGI app (the check reads state, it does no I/O)."""

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:  # type: ignore[override]
        super().on_get(req, resp)


def create_app(
    *,
    readiness: ReadinessCheck,
    debug_tracebacks: bool,
    middleware: list | None = None,
    content_security_policy: str = API_CSP,
) -> falcon.App:
    """A Falcon app with the shared middleware, error handlers and health/metrics routes."""
    shared = [RequestIdMiddleware(), SecurityHeadersMiddleware(content_security_policy), RequestMetricsMiddleware(),
              ErrorEnvelopeMiddleware()]  # fmt: skip
    app = falcon.App(middleware=[*shared, *(middleware or [])])
    app.req_options.strip_url_path_trailing_slash = True
    for exception, handler in make_error_handlers(debug_tracebacks):
        app.add_error_handler(exception, handler)
    app.add_route("/healthz", HealthResource())
    app.add_route("/readyz", ReadinessResource(readiness))
    app.add_route("/metrics", MetricsResource())
    return app


def create_asgi_app(
    *,
    readiness: ReadinessCheck,
    debug_tracebacks: bool,
    middleware: list | None = None,
    request_type: type[falcon.asgi.Request] = falcon.asgi.Request,
) -> falcon.asgi.App:
    """``create_app`` for an ASGI app (the gateway: an event loop serves every connection)."""
    shared = [RequestIdMiddleware(), SecurityHeadersMiddleware(API_CSP), RequestMetricsMiddleware(),
              ErrorEnvelopeMiddleware()]  # fmt: skip
    app = falcon.asgi.App(
        middleware=[*shared, *(middleware or [])],
        request_type=request_type,
    )
    app.req_options.strip_url_path_trailing_slash = True
    for exception, handler in make_error_handlers(debug_tracebacks, asgi=True):
        app.add_error_handler(exception, handler)
    app.add_route("/healthz", AsyncHealthResource())
    app.add_route("/readyz", AsyncReadinessResource(readiness))
    app.add_route("/metrics", AsyncMetricsResource())
    return app


def configure_logging(level: str) -> None:
    """Plain, timestamped logs on stderr (collected by the container runtime); a line written while a
    request is served names its id."""
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s [%(name)s] %(message)s", force=True)
    install_log_filter()
