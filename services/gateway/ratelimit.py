"""A per-client rate limit for the public API (token bucket, per gateway worker, off by default)."""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import falcon

from services.common.errors import ApiError

_MAX_CLIENTS = 100_000  # forget idle clients beyond this many
_LIMITED_PREFIXES = ("/api/", "/v1/")  # the public API (its own API and the OpenAI-compatible one)


class RateLimited(ApiError):
    """The client sent more requests than its rate allows."""

    http_status = falcon.HTTP_429
    error_code = "rate_limited"


class RateLimitMiddleware:
    """Allows ``per_minute`` API requests per client, with bursts of ``burst``."""

    def __init__(self, *, per_minute: int, burst: int, trust_proxy_headers: bool) -> None:
        self._rate = per_minute / 60.0
        self._burst = float(burst)
        self._trust_proxy_headers = trust_proxy_headers
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, last update)
        self._lock = threading.Lock()

    async def process_resource_async(self, req: Any, resp: Any, resource: object, params: dict) -> None:
        if resource is None or not req.path.startswith(_LIMITED_PREFIXES) or req.method == "OPTIONS":
            return
        self.check(req)

    async def process_resource_ws(self, req: Any, ws: Any, resource: object, params: dict) -> None:
        """Opening a WebSocket counts as a request (a refused one gets HTTP 403)."""
        if resource is not None:
            self.check(req)

    def check(self, req: Any) -> None:
        """Count one API request of ``req``'s client (also each WebSocket message that generates);
        RateLimited if its rate is spent."""
        wait = self._take(self._client(req), time.monotonic())
        if wait > 0:
            retry_after = math.ceil(wait)
            raise RateLimited(
                f"Too many requests from this client; retry in {retry_after} s",
                headers={"Retry-After": str(retry_after)},
            )

    def _client(self, req: Any) -> str:
        if self._trust_proxy_headers and req.access_route:
            return req.access_route[0]
        return req.remote_addr or "unknown"

    def _take(self, client: str, now: float) -> float:
        """Spend one token; returns 0, or the seconds until a token is available."""
        with self._lock:
            tokens, last = self._buckets.get(client, (self._burst, now))
            tokens = min(self._burst, tokens + (now - last) * self._rate)
            if tokens < 1:
                self._buckets[client] = (tokens, now)
                return (1 - tokens) / self._rate
            if len(self._buckets) >= _MAX_CLIENTS and client not in self._buckets:
                self._buckets.clear()
            self._buckets[client] = (tokens - 1, now)
            return 0.0
