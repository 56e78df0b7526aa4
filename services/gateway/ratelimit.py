"""A per-client rate limit for the public API (token bucket, per gateway worker, off by default).

Clients are told apart by ``req.context.client`` (services/gateway/auth.py): per API key id when
keys are on, else per address. Anonymous clients of a deployment with keys (when it lets them in)
have a rate of their own.
"""

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
    """Allows ``per_minute`` API requests per client (``anonymous_per_minute`` for clients without a
    key when keys are on; 0: unlimited), with bursts of ``burst``."""

    def __init__(self, *, per_minute: int, burst: int, anonymous_per_minute: int | None = None) -> None:
        self._rates = {True: per_minute / 60.0, False: (anonymous_per_minute or per_minute) / 60.0}
        self._burst = float(burst)
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
        client = req.context.client  # set by ClientMiddleware (services/gateway/auth.py), which runs first
        rate = self._rates[client.key_id is not None]
        wait = self._take(client.name, rate, time.monotonic()) if rate else 0.0
        if wait > 0:
            retry_after = math.ceil(wait)
            raise RateLimited(
                f"Too many requests from this client; retry in {retry_after} s",
                headers={"Retry-After": str(retry_after)},
            )

    def _take(self, client: str, rate: float, now: float) -> float:
        """Spend one token; returns 0, or the seconds until a token is available."""
        with self._lock:
            tokens, last = self._buckets.get(client, (self._burst, now))
            tokens = min(self._burst, tokens + (now - last) * rate)
            if tokens < 1:
                self._buckets[client] = (tokens, now)
                return (1 - tokens) / rate
            if len(self._buckets) >= _MAX_CLIENTS and client not in self._buckets:
                self._buckets.clear()
            self._buckets[client] = (tokens - 1, now)
            return 0.0
