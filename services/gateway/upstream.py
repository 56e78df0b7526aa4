"""HTTP calls from the gateway to inference replicas and the ui, on the worker's event loop.

One aiohttp session per gateway worker (a keep-alive pool per replica, no limit on connections:
every relayed stream holds one while it runs). A call either reads the whole answer (``ReplicaAnswer``)
or leaves the body to be relayed as it comes (``Stream``, closed by whoever relays it; closing it
before the end drops the connection, which stops the generation on the replica). Connection
failures become ``ReplicaUnreachable``. Each call is counted by its ``CallMetrics``: a replica's
by replica and route (the replicas' routes are fixed paths, never a client's URL), the ui's in
metrics of its own. A call made for a client's request carries the request's ``X-Request-Id``
(services/common/web/request_id.py); a WebSocket connection's calls carry its handshake's, for every
message of the connection.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp

from services.common.web import request_id
from services.gateway.metrics import UI_ERRORS, UI_LATENCY, UPSTREAM_ERRORS, UPSTREAM_LATENCY


class ReplicaUnreachable(Exception):
    """A replica could not be reached (``kind``: connect, timeout, protocol)."""

    def __init__(self, replica: str, kind: str, detail: str) -> None:
        super().__init__(f"{replica}: {kind} ({detail})")
        self.replica = replica
        self.kind = kind


class CallMetrics(Protocol):
    """Where a call's latency and failures are counted."""

    def observe(self, seconds: float) -> None: ...

    def failed(self, kind: str) -> None: ...


@dataclass(frozen=True)
class ReplicaCall:
    """A call to an inference replica, on one of its routes."""

    replica: str
    route: str

    def observe(self, seconds: float) -> None:
        UPSTREAM_LATENCY.labels(replica=self.replica, endpoint=self.route).observe(seconds)

    def failed(self, kind: str) -> None:
        UPSTREAM_ERRORS.labels(replica=self.replica, kind=kind).inc()


class DiscoveryProbe:
    """The /readyz of an address discovery gave, asked whose replica it is: not counted. Until it
    answers it is no replica yet (a pod starting, or a replica that scaled to zero), so its failures
    are nobody's upstream errors; the poller logs them at debug level."""

    def observe(self, seconds: float) -> None:
        pass

    def failed(self, kind: str) -> None:
        pass


class UiCall:
    """A page or asset request forwarded to the ui service (whatever its path)."""

    def observe(self, seconds: float) -> None:
        UI_LATENCY.observe(seconds)

    def failed(self, kind: str) -> None:
        UI_ERRORS.labels(kind=kind).inc()


@dataclass(frozen=True)
class ReplicaAnswer:
    """A replica's whole answer."""

    status: int
    headers: Mapping[str, str]  # case-insensitive
    data: bytes


class Stream:
    """A replica's answer whose body is read as it comes; ``close()`` it in any case."""

    def __init__(self, replica: str, response: aiohttp.ClientResponse, metrics: CallMetrics) -> None:
        self._replica = replica
        self._metrics = metrics
        self._response = response
        self.status: int = response.status
        self.headers: Mapping[str, str] = response.headers

    async def read(self) -> ReplicaAnswer:
        """The whole (small) body, e.g. an error answer; the connection goes back to the pool."""
        try:
            return ReplicaAnswer(self.status, self.headers, await self._response.read())
        except (TimeoutError, aiohttp.ClientError) as error:
            raise _failed(self._replica, self._metrics, "protocol", error) from error
        finally:
            self._response.release()

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives; ReplicaUnreachable if the replica breaks off."""
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except (TimeoutError, aiohttp.ClientError) as error:
            raise _failed(self._replica, self._metrics, "protocol", error) from error

    def close(self) -> None:
        """Done with it: a body read to its end returns the connection to the pool, any other is
        dropped (the replica sees its client leave)."""
        if self._response.content.at_eof():
            self._response.release()
        else:
            self._response.close()


class Upstream:
    """Sends requests to replicas; ``start()`` it on the worker's event loop first."""

    def __init__(self, *, connect_timeout_s: float, read_timeout_s: float) -> None:
        self._connect_timeout_s = connect_timeout_s
        self._read_timeout_s = read_timeout_s
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30, ttl_dns_cache=30)
        # No Accept-Encoding of its own (the ui's answers are relayed as they come, compressed only
        # when the client asked for it) and no decompression.
        self._session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False, skip_auto_headers=("Accept-Encoding", "User-Agent")
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(self, replica: str, url: str, method: str, path: str, **kwargs: Any) -> ReplicaAnswer:
        """One call, its answer read whole."""
        return await (await self.stream(replica, url, method, path, **kwargs)).read()

    async def stream(
        self,
        replica: str,
        url: str,
        method: str,
        path: str,
        *,
        fields: dict[str, Any] | None = None,
        json_body: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        read_timeout_s: float | None = None,
        metrics: CallMetrics | None = None,
    ) -> Stream:
        """One call whose body is left unread for relaying (``fields``: the query string); counted as
        a call to ``replica`` on the route ``path`` unless ``metrics`` says otherwise."""
        metrics = metrics or ReplicaCall(replica, path)
        assert self._session is not None, "Upstream.start() first"
        timeout = aiohttp.ClientTimeout(sock_connect=self._connect_timeout_s,
                                        sock_read=read_timeout_s or self._read_timeout_s)  # fmt: skip
        headers = {**(headers or {}), **request_id.outgoing_headers()}
        started = time.perf_counter()
        try:
            response = await self._session.request(
                method, url + path, params=fields, json=json_body, headers=headers, timeout=timeout,
                allow_redirects=False,
            )  # fmt: skip
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as error:
            raise _failed(replica, metrics, "connect", error) from error
        except (TimeoutError, aiohttp.ServerTimeoutError) as error:
            raise _failed(replica, metrics, "timeout", error) from error
        except aiohttp.ClientError as error:
            raise _failed(replica, metrics, "protocol", error) from error
        metrics.observe(time.perf_counter() - started)
        return Stream(replica, response, metrics)


def _failed(replica: str, metrics: CallMetrics, kind: str, error: BaseException) -> ReplicaUnreachable:
    metrics.failed(kind)
    return ReplicaUnreachable(replica, kind, type(error).__name__)
