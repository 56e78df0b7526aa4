"""HTTP resources of the gateway: the v1 API and the SSE stream, relayed to inference replicas."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator
from typing import Any

import falcon
import urllib3

from services.common.errors import ERROR_CODE_HEADER, ERROR_STATUS_HEADER, ApiError, ServiceUnavailable, SessionNotFound
from services.common.params import (
    GenerateParams,
    Limits,
    get_model,
    get_session_id,
    parse_generate,
    parse_open_session,
    read_values,
)
from services.common.replica_request import ReplicaRequest
from services.common.sse import SSE_CONTENT_TYPE, SSE_HEADERS, sse_error
from services.gateway.replicas import Replica, ReplicaSet
from services.gateway.upstream import ReplicaUnreachable, Upstream

logger = logging.getLogger(__name__)
_RETRY_ELSEWHERE = {"too_many_sessions", "unavailable"}  # another replica may accept


class Router:
    """Sends a validated call to the right replica and turns failures into public errors."""

    def __init__(self, replicas: ReplicaSet, upstream: Upstream) -> None:
        self.replicas = replicas
        self.upstream = upstream

    def generate(self, params: GenerateParams, path: str, *, stream: bool = False) -> urllib3.BaseHTTPResponse:
        """A v1 / v2 generation: to its session's replica, else to the least busy one of its model."""
        if params.session_id:
            body = ReplicaRequest(params).to_json()
            return self.to_session(params.session_id, params.model, "POST", path, json_body=body, stream=stream)
        model = self.replicas.resolve(params.model).name
        body = ReplicaRequest(dataclasses.replace(params, model=model)).to_json()
        return self.to_model(model, "sessionless", "POST", path, json_body=body, stream=stream)

    def to_session(
        self, session_id: str, model: str | None, method: str, path: str, **kwargs: Any
    ) -> urllib3.BaseHTTPResponse:
        """Call the replica holding ``session_id``; a gone replica means a gone session."""
        replica = self.replicas.for_session(session_id, model)
        try:
            return self.upstream.request(replica.name, replica.url, method, path, **kwargs)
        except ReplicaUnreachable as error:
            if error.kind == "connect":
                self.replicas.mark_down(replica, f"unreachable ({error})")
            raise SessionNotFound(session_id, detail="Its inference replica is gone.") from error

    def to_model(self, model: str, decision: str, method: str, path: str, **kwargs: Any) -> urllib3.BaseHTTPResponse:
        """Call the least-loaded ready replica of ``model``, moving on while replicas are down or full."""
        return self._first_accepting(self.replicas.least_loaded(decision, model), decision, method, path, **kwargs)

    def to_conversation(self, key: str, model: str, method: str, path: str, **kwargs: Any) -> urllib3.BaseHTTPResponse:
        """Call the replica of ``model`` that holds (or will hold) the conversation ``key``, else the next."""
        candidates = self.replicas.by_affinity(key, model)
        return self._first_accepting(candidates, "conversation", method, path, **kwargs)

    def _first_accepting(
        self, candidates: list[Replica], decision: str, method: str, path: str, **kwargs: Any
    ) -> urllib3.BaseHTTPResponse:
        for index, replica in enumerate(candidates):
            response = self._try(replica, method, path, **kwargs)
            last = index == len(candidates) - 1
            if response is not None and (last or response.headers.get(ERROR_CODE_HEADER) not in _RETRY_ELSEWHERE):
                if decision == "new_session" and ERROR_CODE_HEADER not in response.headers:
                    self.replicas.session_opened(replica)
                return response
        raise ServiceUnavailable("No inference replica could take the request; retry in a few seconds")

    def _try(self, replica: Replica, method: str, path: str, **kwargs: Any) -> urllib3.BaseHTTPResponse | None:
        try:
            with self.replicas.in_flight(replica):
                return self.upstream.request(replica.name, replica.url, method, path, **kwargs)
        except ReplicaUnreachable as error:
            if error.kind != "connect":
                raise ServiceUnavailable(f"Inference replica {replica.name} failed ({error.kind})") from error
            self.replicas.mark_down(replica, f"unreachable ({error})")
            return None


def relay(resp: falcon.Response, upstream: urllib3.BaseHTTPResponse) -> None:
    """Answer with a replica's (already read) response."""
    resp.status = upstream.status
    resp.content_type = upstream.headers.get("Content-Type", falcon.MEDIA_JSON)
    resp.data = upstream.data
    for header in (ERROR_CODE_HEADER, ERROR_STATUS_HEADER, "Retry-After"):
        if header in upstream.headers:
            resp.set_header(header, upstream.headers[header])
    if ERROR_STATUS_HEADER in upstream.headers:
        resp.context.error_status = upstream.headers[ERROR_STATUS_HEADER]


class GenerateResource:
    """``POST /api/v1/generate`` (seed contract)."""

    error_envelope = "v1"

    def __init__(self, router: Router, limits: Limits) -> None:
        self._router = router
        self._limits = limits

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        params = parse_generate(read_values(req, self._limits), self._limits)
        relay(resp, self._router.generate(params, "/api/v1/generate"))


class OpenSessionResource:
    """``GET /api/v1/open_inference_session``: on the least-loaded ready replica of the model."""

    error_envelope = "v1"

    def __init__(self, router: Router, limits: Limits) -> None:
        self._router = router
        self._limits = limits

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        values = read_values(req, self._limits)
        max_length = parse_open_session(values, self._limits)
        model = self._router.replicas.resolve(get_model(values)).name
        fields = {"max_length": max_length, "model": model}
        relay(resp, self._router.to_model(model, "new_session", "GET", "/api/v1/open_inference_session", fields=fields))


class CloseSessionResource:
    """``GET /api/v1/close_inference_session``: on the replica holding the session."""

    error_envelope = "v1"

    def __init__(self, router: Router, limits: Limits) -> None:
        self._router = router
        self._limits = limits

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        values = read_values(req, self._limits)
        session_id = get_session_id(values, required=True)
        path, fields = "/api/v1/close_inference_session", {"session_id": session_id}
        relay(resp, self._router.to_session(session_id, get_model(values), "GET", path, fields=fields))


class GenerateStreamResource:
    """``POST /api/v2/generate_stream``: the replica's Server-Sent Events, relayed as they come."""

    def __init__(self, router: Router, limits: Limits) -> None:
        self._router = router
        self._limits = limits

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        params = parse_generate(read_values(req, self._limits), self._limits)
        upstream = self._router.generate(params, "/api/v2/generate_stream", stream=True)
        if upstream.status != 200:
            relay(resp, upstream)  # reads and caches the (small) error body
            upstream.release_conn()
            return
        resp.content_type = SSE_CONTENT_TYPE
        resp.set_headers(SSE_HEADERS)
        resp.stream = _relay_events(upstream, params.session_id)


def upstream_chunks(upstream: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
    """A streamed response's body as it comes; ReplicaUnreachable if the replica breaks off.

    Closing the iterator early (the client went away) drops the connection, which stops the
    generation on the replica.
    """
    complete = False
    try:
        yield from upstream.read_chunked() if upstream.chunked else upstream.stream(1024)
        complete = True
    except (urllib3.exceptions.HTTPError, OSError) as error:
        logger.warning("stream from an inference replica broke off", exc_info=True)
        raise ReplicaUnreachable("replica", "protocol", type(error).__name__) from error
    finally:
        if not complete:
            upstream.close()
        upstream.release_conn()


def upstream_error(upstream: urllib3.BaseHTTPResponse) -> ApiError:
    """A replica's error answer (standard envelope), to re-raise in this endpoint's envelope."""
    try:
        error = json.loads(upstream.data)["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        code, message = "upstream_error", f"The inference replica answered HTTP {upstream.status}"
    retry_after = upstream.headers.get("Retry-After")
    headers = {"Retry-After": retry_after} if retry_after else None
    return ApiError(message, status=falcon.code_to_http_status(upstream.status), code=code, headers=headers)


def _relay_events(upstream: urllib3.BaseHTTPResponse, session_id: str | None) -> Iterator[bytes]:
    """Copy the replica's stream; if the replica dies mid-stream, end with an error event."""
    try:
        yield from upstream_chunks(upstream)
    except ReplicaUnreachable:
        if session_id:
            yield sse_error("session_not_found", f"Its inference replica is gone. {SessionNotFound(session_id)}")
        else:
            yield sse_error("upstream_error", "The inference replica stopped answering; retry")
