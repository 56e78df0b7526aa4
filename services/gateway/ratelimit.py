"""A per-client rate limit for the public API (token bucket, per gateway worker, off by default).

It applies to the API's resources: every matched resource not marked public (see
services/gateway/auth.py), whatever the spelling of its path. Clients are told apart by
``req.context.client`` (set in auth.py): per API key id when keys are on, else per address.
Anonymous clients of a deployment with keys (when it lets them in) have a rate of their own.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import falcon

from services.common.web.errors import ApiError
from services.gateway.auth import is_public

_MAX_CLIENTS = 100_000  # forget idle clients beyond this many


class RateLimited(ApiError):
    """The client sent more requests than its rate allows."""

    http_status = falcon.HTTP_429
    error_code = "rate_limited"


class TokenBuckets:
    """Token buckets by client name (per gateway worker): ``rate`` tokens a second, at most ``burst``."""

    def __init__(self, burst: float) -> None:
        self._burst = burst
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, last update)
        self._lock = threading.Lock()

    def take(self, client: str, rate: float, now: float) -> float:
        """Spend one token; returns 0, or the seconds until a token is available."""
        with self._lock:
            tokens = self._tokens(client, rate, now)
            if tokens < 1:
                self._buckets[client] = (tokens, now)
                return (1 - tokens) / rate
            if len(self._buckets) >= _MAX_CLIENTS and client not in self._buckets:
                self._buckets.clear()
            self._buckets[client] = (tokens - 1, now)
            return 0.0

    def wait(self, client: str, rate: float, now: float) -> float:
        """The seconds until ``client`` has a token (0: it has one), spending none."""
        with self._lock:
            return max(0.0, 1 - self._tokens(client, rate, now)) / rate

    def _tokens(self, client: str, rate: float, now: float) -> float:
        tokens, last = self._buckets.get(client, (self._burst, now))
        return min(self._burst, tokens + (now - last) * rate)


def too_many(wait_s: float, what: str) -> RateLimited:
    """The 429 for a client that must wait ``wait_s`` seconds."""
    retry_after = math.ceil(wait_s)
    return RateLimited(f"{what}; retry in {retry_after} s", headers={"Retry-After": str(retry_after)})


class RefusalThrottle:
    """Refused API keys per client address: after ``per_minute`` refusals in a burst, one more a
    ``60 / per_minute`` s; an address past that gets 429, whatever key it brings, so that keys cannot
    be guessed at full speed."""

    def __init__(self, per_minute: int) -> None:
        self._rate = per_minute / 60.0
        self._buckets = TokenBuckets(float(per_minute))

    def check(self, address: str) -> None:
        """RateLimited if ``address`` has spent its refusals."""
        wait = self._buckets.wait(address, self._rate, time.monotonic())
        if wait > 0:
            raise too_many(wait, "Too many refused API keys from this address")

    def refused(self, address: str) -> None:
        """Count one refusal of ``address``."""
        self._buckets.take(address, self._rate, time.monotonic())


class RateLimitMiddleware:
    """Allows ``per_minute`` API requests per client (``anonymous_per_minute`` for clients without a
    key when keys are on; 0: unlimited), with bursts of ``burst``."""

    def __init__(self, *, per_minute: int, burst: int, anonymous_per_minute: int | None = None) -> None:
        self._rates = {True: per_minute / 60.0, False: (anonymous_per_minute or per_minute) / 60.0}
        self._buckets = TokenBuckets(float(burst))

    async def process_resource_async(self, req: Any, resp: Any, resource: object, params: dict) -> None:
        if resource is None or is_public(resource) or req.method == "OPTIONS":
            return
        self.check(req)

    async def process_resource_ws(self, req: Any, ws: Any, resource: object, params: dict) -> None:
        """Opening a WebSocket counts as a request (a refused one gets HTTP 403)."""
        if resource is not None and not is_public(resource):
            self.check(req)

    def check(self, req: Any) -> None:
        """Count one API request of ``req``'s client (also each WebSocket message that generates);
        RateLimited if its rate is spent."""
        client = req.context.client  # set by ClientMiddleware (services/gateway/auth.py), which runs first
        rate = self._rates[client.key_id is not None]
        wait = self._buckets.take(client.name, rate, time.monotonic()) if rate else 0.0
        if wait > 0:
            raise too_many(wait, "Too many requests from this client")
