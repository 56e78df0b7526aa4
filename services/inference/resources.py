"""HTTP resources of the inference service: the v1 API of the seed contract."""

from __future__ import annotations

import falcon

from services.common.params import Limits, get_session_id, parse_generate, parse_open_session, read_values
from services.inference.generation import Generator
from services.inference.model import ModelHandle
from services.inference.sessions import SessionStore


class GenerateResource:
    """``POST /api/v1/generate``: generate text, in a session or not."""

    legacy_envelope = True

    def __init__(self, generator: Generator, limits: Limits) -> None:
        self._generator = generator
        self._limits = limits

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        params = parse_generate(read_values(req, self._limits), self._limits)
        result = self._generator.generate(params)
        resp.media = {"ok": True, "outputs": result.text}


class OpenSessionResource:
    """``GET /api/v1/open_inference_session?max_length=N``."""

    legacy_envelope = True

    def __init__(self, model: ModelHandle, store: SessionStore, limits: Limits) -> None:
        self._model = model
        self._store = store
        self._limits = limits

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        max_length = parse_open_session(read_values(req, self._limits), self._limits)
        self._model.require_ready()
        session = self._store.open(max_length)
        resp.media = {"ok": True, "session_id": session.session_id}


class CloseSessionResource:
    """``GET /api/v1/close_inference_session?session_id=...``."""

    legacy_envelope = True

    def __init__(self, store: SessionStore, limits: Limits) -> None:
        self._store = store
        self._limits = limits

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        session_id = get_session_id(read_values(req, self._limits), required=True)
        self._store.close(session_id)
        resp.media = {"ok": True}
