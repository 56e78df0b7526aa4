"""The API gateway: the public API, validated at the edge, routed to inference replicas.

Stateless: any number of gateway replicas and gunicorn workers serve the same sessions,
because a session's id names the replica that holds it (see replicas.py).
"""

from __future__ import annotations

import falcon

from services.common.app import configure_logging
from services.common.app import create_app as create_base_app
from services.common.config import load_or_exit
from services.gateway.openai_api import ChatCompletionsResource, CompletionsResource, ModelsResource
from services.gateway.openapi import OpenApiResource
from services.gateway.poller import ReplicaPoller
from services.gateway.ratelimit import RateLimitMiddleware
from services.gateway.replicas import ReplicaSet
from services.gateway.resources import (
    CloseSessionResource,
    GenerateResource,
    GenerateStreamResource,
    OpenSessionResource,
    Router,
)
from services.gateway.settings import GatewaySettings
from services.gateway.ui_proxy import UI_PATHS, UiProxy
from services.gateway.upstream import Upstream


def build_app(settings: GatewaySettings) -> tuple[falcon.App, ReplicaPoller]:
    """The gateway's WSGI app and the poller of its replicas (not started yet)."""
    upstream = Upstream(
        connect_timeout_s=settings.connect_timeout_s,
        read_timeout_s=settings.read_timeout_s,
        pool_size=settings.server.threads,
    )
    replicas = ReplicaSet(settings.replicas, settings.default_model)
    middleware: list = [falcon.CORSMiddleware(allow_origins="*" if "*" in settings.cors_allow_origins
                                              else list(settings.cors_allow_origins))]  # fmt: skip
    if settings.rate_limit_per_minute:
        middleware.append(
            RateLimitMiddleware(
                per_minute=settings.rate_limit_per_minute,
                burst=settings.rate_limit_burst,
                trust_proxy_headers=settings.trust_proxy_headers,
            )
        )

    def readiness() -> tuple[bool, dict]:
        return replicas.any_ready(), {"replicas": replicas.status()}

    app = create_base_app(readiness=readiness, debug_tracebacks=settings.debug_tracebacks, middleware=middleware)
    router, limits = Router(replicas, upstream), settings.limits
    app.add_route("/api/v1/generate", GenerateResource(router, limits))
    app.add_route("/api/v1/open_inference_session", OpenSessionResource(router, limits))
    app.add_route("/api/v1/close_inference_session", CloseSessionResource(router, limits))
    app.add_route("/api/v2/generate_stream", GenerateStreamResource(router, limits))
    app.add_route("/api/openapi.json", OpenApiResource(limits))
    app.add_route("/v1/models", ModelsResource(router))
    app.add_route("/v1/completions", CompletionsResource(router, limits))
    app.add_route("/v1/chat/completions", ChatCompletionsResource(router, limits))
    if settings.ui_url:
        app.add_sink(UiProxy(upstream, settings.ui_url), prefix=UI_PATHS)
    return app, ReplicaPoller(replicas, upstream, settings.poll_interval_s)


def create_app() -> falcon.App:
    """gunicorn's app factory (runs in each worker): settings, replica polling, the app."""
    settings = load_or_exit(GatewaySettings.from_env, "gateway")
    configure_logging(settings.server.log_level)
    app, poller = build_app(settings)
    poller.start()
    return app
