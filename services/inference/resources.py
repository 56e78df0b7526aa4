"""HTTP resources of the inference service: the v1 API of the seed contract."""

from __future__ import annotations

from collections.abc import Iterator

import falcon

from services.common.errors import ApiError, InvalidParameter, report_incident
from services.common.params import Limits, get_model, get_session_id, parse_open_session, read_values
from services.common.replica_request import ReplicaRequest, get_client
from services.common.sse import SSE_CONTENT_TYPE, SSE_HEADERS, sse_error, sse_event
from services.inference.generation import Generation, GenerationResult, TokenEvent
from services.inference.model import ModelHandle
from services.inference.planner import GenerationPlanner
from services.inference.sessions import SessionStore


class GenerateResource:
    """``POST /api/v1/generate``: generate text, in a session or not."""

    error_envelope = "v1"

    def __init__(self, planner: GenerationPlanner, limits: Limits) -> None:
        self._planner = planner
        self._limits = limits

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        request = ReplicaRequest.from_json(read_values(req, self._limits), self._limits)
        result = self._planner.generate(request)
        resp.media = {"ok": True, "outputs": result.text}


class GenerateStreamResource:
    """``POST /api/v2/generate_stream``: Server-Sent Events, one ``token`` event per token, then ``done``.

    Errors found before generation starts get their real HTTP status; an error during the
    stream ends it with an ``error`` event. A client that disconnects stops the generation.
    The body is a ReplicaRequest (the v1 parameters, and the gateway's ``model``,
    ``conversation`` and ``fill_context``).
    """

    def __init__(self, planner: GenerationPlanner, limits: Limits) -> None:
        self._planner = planner
        self._limits = limits

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        request = ReplicaRequest.from_json(read_values(req, self._limits), self._limits)
        generation = self._planner.prepare(request)
        resp.content_type = SSE_CONTENT_TYPE
        resp.set_headers(SSE_HEADERS)
        resp.stream = SseBody(generation)


class SseBody:
    """A generation's events as an SSE response body.

    The WSGI server closes the body however the response ends (PEP 3333): closing stops the
    generation and releases its session, also when the body was never iterated (a generator that
    never ran ignores ``close``). gunicorn always takes a first chunk; a server need not.
    """

    def __init__(self, generation: Generation) -> None:
        self._generation = generation
        self._chunks = _sse_chunks(generation.stream())

    def __iter__(self) -> Iterator[bytes]:
        return self._chunks

    def close(self) -> None:
        self._chunks.close()
        self._generation.close()


def _sse_chunks(events: Iterator[TokenEvent | GenerationResult]) -> Iterator[bytes]:
    try:
        for event in events:
            if isinstance(event, TokenEvent):
                yield sse_event("token", {"text": event.text, "generated_tokens": event.generated_tokens})
            else:
                yield sse_event("done", {"ok": True, **event.summary()})
    except ApiError as error:
        yield sse_error(error.error_code, error.message)
    except Exception as error:
        yield sse_error("internal_error", report_incident(error, "a streamed generation"))


class OpenSessionResource:
    """``GET /api/v1/open_inference_session?max_length=N``."""

    error_envelope = "v1"

    def __init__(self, model: ModelHandle, store: SessionStore, limits: Limits) -> None:
        self._model = model
        self._store = store
        self._limits = limits

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        values = read_values(req, self._limits)
        max_length = parse_open_session(values, self._limits)
        self._model.require_model(get_model(values))
        self._model.require_ready()
        self._model.require_length(max_length)
        session = self._store.open(max_length, client=get_client(values))
        resp.media = {"ok": True, "session_id": session.session_id}


class CloseSessionResource:
    """``GET /api/v1/close_inference_session?session_id=...`` (and the gateway's ``client``: its owner)."""

    error_envelope = "v1"

    def __init__(self, store: SessionStore, limits: Limits) -> None:
        self._store = store
        self._limits = limits

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        values = read_values(req, self._limits)
        self._store.close(get_session_id(values, required=True), client=get_client(values))
        resp.media = {"ok": True}


class CloseClientSessionsResource:
    """``POST /internal/close_client_sessions?client=key:<id>``: the gateway closes the sessions of a
    removed API key (only the gateway reaches a replica)."""

    def __init__(self, store: SessionStore, limits: Limits) -> None:
        self._store = store
        self._limits = limits

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        client = get_client(read_values(req, self._limits))
        if client is None:
            raise InvalidParameter("client is required")
        resp.media = {"ok": True, "closed": self._store.close_client(client)}
