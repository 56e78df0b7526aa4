"""Prometheus plumbing shared by every service: request metrics and the /metrics endpoint.

When ``PROMETHEUS_MULTIPROC_DIR`` is set (gunicorn with several workers), every worker
writes its samples there and /metrics aggregates them (prometheus-client multiprocess mode),
so totals are correct whichever worker answers the scrape.
"""

from __future__ import annotations

import os
import time

import falcon
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import multiprocess as prometheus_multiprocess

REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

REQUESTS = Counter(
    "petals_chat_requests",
    "HTTP requests by endpoint (route template) and status (the semantic status: a v1 error answered "
    "with HTTP 200 and ok=false counts under its real status, e.g. 404 for an unknown session).",
    ["endpoint", "status"],
)
REQUEST_DURATION = Histogram(
    "petals_chat_request_duration_seconds",
    "Time from request to response, by endpoint.",
    ["endpoint"],
    buckets=REQUEST_BUCKETS,
)


def endpoint_label(req: falcon.Request) -> str:
    """The matched route template: bounded label values whatever the URL."""
    return req.uri_template or "unmatched"


class RequestMetricsMiddleware:
    """Counts and times every request."""

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.started_at = time.perf_counter()

    def process_response(self, req: falcon.Request, resp: falcon.Response, resource, req_succeeded: bool) -> None:
        endpoint = endpoint_label(req)
        status = resp.context.get("error_status") or resp.status
        REQUESTS.labels(endpoint=endpoint, status=str(status).split()[0]).inc()
        started = req.context.get("started_at")
        if started is not None:
            REQUEST_DURATION.labels(endpoint=endpoint).observe(time.perf_counter() - started)

    async def process_request_async(self, req, resp) -> None:
        self.process_request(req, resp)

    async def process_response_async(self, req, resp, resource, req_succeeded: bool) -> None:
        self.process_response(req, resp, resource, req_succeeded)


class MetricsResource:
    """``GET /metrics``: the Prometheus text exposition."""

    public = True  # open to everyone, also when the gateway wants API keys (services/gateway/auth.py)

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = CONTENT_TYPE_LATEST
        resp.data = generate_latest(_registry())


class AsyncMetricsResource:
    """``GET /metrics`` in an ASGI app. (Reading the multiprocess files takes a few ms; a scrape
    every few seconds may hold the event loop that long.)"""

    public = True

    async def on_get(self, req, resp) -> None:
        resp.content_type = CONTENT_TYPE_LATEST
        resp.data = generate_latest(_registry())


def _registry():
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        prometheus_multiprocess.MultiProcessCollector(registry)
        return registry
    from prometheus_client import REGISTRY

    return REGISTRY
