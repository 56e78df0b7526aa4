"""The API gateway: the public API, validated at the edge, routed to inference replicas.

Stateless: any number of gateway replicas and gunicorn workers serve the same sessions,
because a session's id names the replica that holds it (see replicas.py). An ASGI app (Falcon's)
on an event loop per worker (gunicorn with Uvicorn workers, see worker.py): an open connection, a
relayed stream or an idle WebSocket costs no thread.
"""

from __future__ import annotations

import falcon
import falcon.asgi

from services.common.startup.config import load_or_exit
from services.common.web.app import configure_logging, create_asgi_app
from services.common.web.errors import Unauthorized
from services.gateway.auth import ClientMiddleware, handle_unauthorized, redact_server_logs
from services.gateway.openai_api import ChatCompletionsResource, CompletionsResource, ModelsResource
from services.gateway.openapi import OpenApiResource
from services.gateway.poller import ReplicaPoller
from services.gateway.ratelimit import RateLimitMiddleware, RefusalThrottle
from services.gateway.relay import Request
from services.gateway.replicas import ReplicaSet
from services.gateway.routing import Router
from services.gateway.settings import GatewaySettings
from services.gateway.stream_api import GenerateStreamResource
from services.gateway.swarm_api import SwarmResource
from services.gateway.tokenizer_api import DetokenizeResource, TokenizeResource
from services.gateway.ui_proxy import UI_PATHS, UiProxy
from services.gateway.upstream import Upstream
from services.gateway.v1_api import CloseSessionResource, GenerateResource, OpenSessionResource
from services.gateway.websocket import GenerateSocketResource


class Lifespan:
    """Falcon middleware for the ASGI lifespan: each worker opens its HTTP client and starts polling
    the replicas when it starts (before it serves), and stops both when it stops."""

    def __init__(self, upstream: Upstream, poller: ReplicaPoller) -> None:
        self._upstream = upstream
        self._poller = poller

    async def process_startup(self, scope: dict, event: dict) -> None:
        await self._upstream.start()
        await self._poller.start()

    async def process_shutdown(self, scope: dict, event: dict) -> None:
        await self._poller.stop()
        await self._upstream.close()


def build_app(settings: GatewaySettings) -> falcon.asgi.App:
    """The gateway's ASGI app (its lifespan starts the replica polling)."""
    upstream = Upstream(connect_timeout_s=settings.connect_timeout_s, read_timeout_s=settings.read_timeout_s)
    replicas = ReplicaSet(settings.replicas, settings.default_model, discovered_models=settings.discovery.models(),
                          cold_start_retry_s=settings.cold_start_retry_s)  # fmt: skip
    poller = ReplicaPoller(replicas, upstream, settings.poll_interval_s, settings.api_keys, settings.discovery)
    origins = "*" if "*" in settings.cors_allow_origins else list(settings.cors_allow_origins)
    refusals = RefusalThrottle(settings.auth_failures_per_minute) if settings.auth_failures_per_minute else None
    clients = ClientMiddleware(settings.api_keys, anonymous=bool(settings.anonymous_rate_limit_per_minute),
                               trusted_proxies=settings.trusted_proxies, refusals=refusals)  # fmt: skip
    middleware: list = [Lifespan(upstream, poller), falcon.CORSMiddleware(allow_origins=origins), clients]
    rate_limit = None
    if settings.rate_limit_per_minute or settings.anonymous_rate_limit_per_minute:
        rate_limit = RateLimitMiddleware(
            per_minute=settings.rate_limit_per_minute,
            burst=settings.rate_limit_burst,
            anonymous_per_minute=settings.anonymous_rate_limit_per_minute or None,
        )
        middleware.append(rate_limit)

    def readiness() -> tuple[bool, dict]:
        return replicas.any_ready(), {"replicas": replicas.status()}

    app = create_asgi_app(readiness=readiness, debug_tracebacks=settings.debug_tracebacks, middleware=middleware,
                          request_type=Request)  # fmt: skip
    app.add_error_handler(Unauthorized, handle_unauthorized)
    app.ws_options.max_receive_queue = 0  # each connection reads its messages itself (no extra task)
    router, limits = Router(replicas, upstream, poller.refresh, poller.find_new), settings.limits
    app.add_route("/api/v1/generate", GenerateResource(router, limits))
    app.add_route("/api/v1/open_inference_session", OpenSessionResource(router, limits))
    app.add_route("/api/v1/close_inference_session", CloseSessionResource(router, limits))
    app.add_route("/api/v2/generate_stream", GenerateStreamResource(router, limits))
    app.add_route("/api/v2/generate", GenerateSocketResource(router, settings, rate_limit))
    app.add_route("/api/v2/swarm", SwarmResource(replicas, upstream))
    app.add_route(
        "/api/openapi.json",
        OpenApiResource(limits, replicas, api_keys=bool(settings.api_keys), max_choices=settings.openai_max_choices),
    )
    app.add_route("/v1/models", ModelsResource(router))
    choices = settings.openai_max_choices
    app.add_route("/v1/completions", CompletionsResource(router, limits, choices))
    app.add_route("/v1/chat/completions", ChatCompletionsResource(router, limits, choices))
    app.add_route("/v1/tokenize", TokenizeResource(router, limits))
    app.add_route("/v1/detokenize", DetokenizeResource(router, limits))
    if settings.ui_url:
        app.add_sink(UiProxy(upstream, settings.ui_url), prefix=UI_PATHS)
    return app


def create_app() -> falcon.asgi.App:
    """gunicorn's app factory (runs in each worker): settings, then the app."""
    settings = load_or_exit(GatewaySettings.from_env, "gateway")
    configure_logging(settings.server.log_level)
    redact_server_logs()
    return build_app(settings)
