"""HTTP calls from the gateway to inference replicas (one connection pool per worker)."""

from __future__ import annotations

import json
import time
from typing import Any

import urllib3
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError, ProtocolError, ReadTimeoutError

from services.gateway.metrics import UPSTREAM_ERRORS, UPSTREAM_LATENCY


class ReplicaUnreachable(Exception):
    """A replica could not be reached (``kind``: connect, timeout, protocol)."""

    def __init__(self, replica: str, kind: str, detail: str) -> None:
        super().__init__(f"{replica}: {kind} ({detail})")
        self.replica = replica
        self.kind = kind


class Upstream:
    """Sends requests to replicas (a keep-alive pool per replica); connection failures become
    ReplicaUnreachable."""

    def __init__(self, *, connect_timeout_s: float, read_timeout_s: float, pool_size: int) -> None:
        self._pool_size = pool_size
        self._pools: dict[str, urllib3.HTTPConnectionPool] = {}
        self._connect_timeout_s = connect_timeout_s
        self._read_timeout_s = read_timeout_s

    def _pool(self, url: str) -> urllib3.HTTPConnectionPool:
        pool = self._pools.get(url)
        if pool is None:  # a race creates two pools once, harmlessly
            pool = urllib3.connection_from_url(url, maxsize=self._pool_size, block=False, retries=False)
            self._pools[url] = pool
        return pool

    def request(
        self,
        replica: str,
        url: str,
        method: str,
        path: str,
        *,
        fields: dict[str, Any] | None = None,
        json_body: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        stream: bool = False,
        decode_content: bool = True,
        read_timeout_s: float | None = None,
    ) -> urllib3.BaseHTTPResponse:
        """One call; with ``stream`` the body is left unread for relaying."""
        timeout = urllib3.Timeout(connect=self._connect_timeout_s, read=read_timeout_s or self._read_timeout_s)
        body = json.dumps(json_body).encode() if json_body is not None else None
        if body is not None:
            headers = {**(headers or {}), "Content-Type": "application/json"}
        started = time.perf_counter()
        try:
            response = self._pool(url).request(
                method, path, fields=fields, body=body, headers=headers, timeout=timeout,
                preload_content=not stream, decode_content=decode_content, redirect=False,
            )  # fmt: skip
        except (NewConnectionError, ConnectTimeoutError) as error:
            raise self._failed(replica, "connect", error) from error
        except ReadTimeoutError as error:
            raise self._failed(replica, "timeout", error) from error
        except (ProtocolError, urllib3.exceptions.HTTPError) as error:
            raise self._failed(replica, "protocol", error) from error
        UPSTREAM_LATENCY.labels(replica=replica, endpoint=path).observe(time.perf_counter() - started)
        return response

    @staticmethod
    def _failed(replica: str, kind: str, error: Exception) -> ReplicaUnreachable:
        UPSTREAM_ERRORS.labels(replica=replica, kind=kind).inc()
        return ReplicaUnreachable(replica, kind, type(error).__name__)
