"""HTTP resources of the inference service: the v1 API of the seed contract and its SSE stream (which
also runs the WebSocket API's steps)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

import falcon

from services.common.api.params import Limits, get_bool, get_model, get_session_id, parse_open_session, read_values
from services.common.api.replica_request import ReplicaRequest, get_client
from services.common.api.step_rule import StepsRequest
from services.common.web.errors import ApiError, InvalidParameter, report_incident
from services.common.web.sse import SSE_CONTENT_TYPE, SSE_HEADERS, sse_error, sse_event
from services.inference.generation import GenerationResult, PromptScores, TokenEvent
from services.inference.model import ModelHandle
from services.inference.planner import GenerationPlanner
from services.inference.sessions import SessionStore
from services.inference.step_loop import StepMessage, SteppedGeneration, StepsEnded
from services.inference.swarm_watch import SwarmWatch


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
    With the OpenAI options (services/common/api/token_options.py), each ``token`` event carries its
    ``logprobs`` entry, ``done`` the ``cumulative_logprob``, and a ``prompt`` event with the prompt's
    entries comes first when they were asked for.

    Errors found before generation starts get their real HTTP status; an error during the
    stream ends it with an ``error`` event. A client that disconnects stops the generation.
    The body is a ReplicaRequest (the v1 parameters, and the gateway's ``model``,
    ``conversation`` and ``fill_context``), or with ``steps`` a StepsRequest: a WebSocket
    ``generate`` message run step by step (services/common/api/step_rule.py), whose events are a
    ``message`` per message for the client and an SSE comment per token, then ``done`` with the
    last message and ``ended_by_extra``.
    """

    def __init__(self, planner: GenerationPlanner, limits: Limits) -> None:
        self._planner = planner
        self._limits = limits

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        values = read_values(req, self._limits)
        if get_bool(values, "steps", default=False):
            steps = SteppedGeneration(self._planner, StepsRequest.from_json(values, self._limits))
            body = SseBody(steps, _step_event)
        else:
            body = SseBody(self._planner.prepare(ReplicaRequest.from_json(values, self._limits)))
        resp.content_type = SSE_CONTENT_TYPE
        resp.set_headers(SSE_HEADERS)
        resp.stream = body


class Streamed(Protocol):
    """A prepared generation (or the steps of one): its events, and ``close`` to stop it."""

    def stream(self) -> Iterator[Any]: ...

    def close(self) -> None: ...


def _generation_event(event: TokenEvent | PromptScores | GenerationResult) -> bytes:
    if isinstance(event, TokenEvent):
        scores = {} if event.logprobs is None else {"logprobs": event.logprobs}
        return sse_event("token", {"text": event.text, "generated_tokens": event.generated_tokens, **scores})
    if isinstance(event, PromptScores):
        return sse_event("prompt", {"logprobs": event.entries})
    return sse_event("done", {"ok": True, **event.summary()})


def _step_event(event: StepMessage | StepsEnded) -> bytes:
    if isinstance(event, StepsEnded):
        return sse_event("done", {"ok": True, "message": event.message, "ended_by_extra": event.ended_by_extra})
    return b":\n\n" if event.message is None else sse_event("message", event.message)


class SseBody:
    """A generation's events as an SSE response body.

    The WSGI server closes the body however the response ends (PEP 3333): closing stops the
    generation and releases its session, also when the body was never iterated (a generator that
    never ran ignores ``close``). gunicorn always takes a first chunk; a server need not.
    """

    def __init__(self, generation: Streamed, encode: Callable[[Any], bytes] = _generation_event) -> None:
        self._generation = generation
        self._chunks = _sse_chunks(generation.stream(), encode)

    def __iter__(self) -> Iterator[bytes]:
        return self._chunks

    def close(self) -> None:
        self._chunks.close()
        self._generation.close()


def _sse_chunks(events: Iterator[Any], encode: Callable[[Any], bytes] = _generation_event) -> Iterator[bytes]:
    try:
        for event in events:
            yield encode(event)
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


class SwarmStateResource:
    """``GET /internal/swarm``: the last summary of the swarm's state for this replica's model (read in
    the background, services/inference/swarm_watch.py); answered also while the replica is not ready."""

    def __init__(self, watch: SwarmWatch) -> None:
        self._watch = watch

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = self._watch.latest().to_json()
