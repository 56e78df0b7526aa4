"""The inference service: a Falcon app holding the Petals client and users' sessions.

gunicorn runs it with one worker (sessions live in that worker's memory) and many threads;
see gunicorn.conf.py beside this file.
"""

from __future__ import annotations

import logging
import time

import falcon

from services.common.api.handover import ADOPT_SESSION_PATH
from services.common.api.replica_request import CLOSE_CLIENT_SESSIONS_PATH, DETOKENIZE_PATH, TOKENIZE_PATH
from services.common.api.swarm_state import SWARM_PATH
from services.common.chat.model_card import ModelCard
from services.common.gunicorn import gthread_worker
from services.common.startup.config import load_or_exit
from services.common.web.app import configure_logging
from services.common.web.app import create_app as create_base_app
from services.inference.handover import AdoptSessionResource, SessionMover
from services.inference.model import ModelHandle
from services.inference.planner import GenerationPlanner
from services.inference.resources import (
    CloseClientSessionsResource,
    CloseSessionResource,
    GenerateResource,
    GenerateStreamResource,
    OpenSessionResource,
    SwarmStateResource,
)
from services.inference.sessions import SessionStore
from services.inference.settings import InferenceSettings
from services.inference.swarm_watch import SwarmWatch
from services.inference.tokenizer_api import DetokenizeResource, TokenizeResource

logger = logging.getLogger(__name__)


class InferenceService:
    """The model, the session store and the HTTP app, with their lifecycle."""

    def __init__(self, settings: InferenceSettings) -> None:
        self.settings = settings
        self.model = ModelHandle(settings)
        self.store = SessionStore(
            self.model.open_petals_session,
            replica_id=settings.replica_id,
            ttl_s=settings.session_ttl_s,
            max_sessions=settings.max_sessions,
            max_sessions_per_client=settings.max_sessions_per_client,
            max_one_off=settings.max_sessionless_requests,
        )
        self.swarm = SwarmWatch(
            settings.model_name, self.model.sequence_manager, refresh_s=settings.swarm_state_refresh_s,
            max_servers=settings.swarm_state_max_servers, thresholds=settings.swarm_thresholds,
        )  # fmt: skip
        self._card: ModelCard | None = None
        self.app = self._build_app()

    def _build_app(self) -> falcon.App:
        settings, limits = self.settings, self.settings.limits
        app = create_base_app(readiness=self.readiness, debug_tracebacks=settings.debug_tracebacks)
        planner = GenerationPlanner(self.model, self.store, limits)
        app.add_route("/api/v1/generate", GenerateResource(planner, limits))
        app.add_route("/api/v2/generate_stream", GenerateStreamResource(planner, limits))
        app.add_route("/api/v1/open_inference_session", OpenSessionResource(self.model, self.store, limits))
        app.add_route("/api/v1/close_inference_session", CloseSessionResource(self.store, limits))
        app.add_route(CLOSE_CLIENT_SESSIONS_PATH, CloseClientSessionsResource(self.store, limits))
        app.add_route(SWARM_PATH, SwarmStateResource(self.swarm))
        app.add_route(TOKENIZE_PATH, TokenizeResource(self.model, limits))
        app.add_route(DETOKENIZE_PATH, DetokenizeResource(self.model, limits))
        if settings.handover_token:  # no token, no way in
            app.add_route(ADOPT_SESSION_PATH, AdoptSessionResource(self.model, self.store, settings.handover_token))
        return app

    def readiness(self) -> tuple[bool, dict]:
        """Ready when the swarm serves every block; the load figures feed the gateway's routing, the
        model card (once the tokenizer has told the chat format) its choice of model."""
        ready, detail = self.model.readiness()
        if self.store.stopping:
            ready, detail = False, "stopping: its sessions move to another replica"
        load = {"active_sessions": len(self.store), "max_sessions": self.settings.max_sessions}
        card = self._model_card()
        identity = {"replica_id": self.settings.replica_id, "model": self.settings.model_name}
        card_json = card.to_json() if card else None
        moved = {"stopping": self.store.stopping, "adopted_sessions": self.store.adopted_keys()}
        return ready, {"detail": detail, **identity, **load, "model_card": card_json, **moved}

    def _model_card(self) -> ModelCard | None:
        if self._card is None and self.model.tokenizer is not None:
            chat_format = self.settings.chat.resolve(self.model.tokenizer)
            self._card = self.settings.model_card(chat_format, self.model.max_length)
        return self._card

    def start(self) -> None:
        """Start loading the model and reaping expired sessions."""
        self.model.start()
        self.swarm.start()
        self.store.start_reaper(self.settings.reaper_interval_s)

    def hand_over_sessions(self) -> None:
        """On SIGTERM, while the worker still serves: hand every session to a peer (with a token and
        peers or discovery; else they are closed at shutdown, as before), then keep redirecting their requests
        for HANDOVER_LINGER_SECONDS, so every gateway worker has polled the adopters meanwhile."""
        settings = self.settings
        if not (settings.handover_token and (settings.peers or settings.discovery)):
            return
        mover = SessionMover(self.store, settings.model_name, settings.replica_id, settings.handover_token,
                             settings.peers, settings.discovery)  # fmt: skip
        done, _failed = mover.hand_over_all()
        if done:
            time.sleep(settings.handover_linger_s)

    def shutdown(self) -> None:
        """Close every session (reason ``shutdown``) so the servers free their caches."""
        logger.info("shutting down: closing %d sessions", len(self.store))
        self.store.stop_reaper()
        self.swarm.stop()
        self.store.close_all("shutdown")  # while the swarm connection is still up
        self.model.stop()


_service: InferenceService | None = None


def create_app() -> falcon.App:
    """gunicorn's app factory: read settings, start the service, return its WSGI app."""
    global _service
    settings = load_or_exit(InferenceSettings.from_env, "inference")
    configure_logging(settings.server.log_level)
    from services.inference import patches  # imports Petals: the worker's, not the modules importing this one

    # a patch that does not fit stops the worker here, with its one line
    patches.install(settings.step_batching, settings.step_batch_sessions)
    _service = InferenceService(settings)
    _service.start()
    gthread_worker.before_stopping(_service.hand_over_sessions)
    return _service.app


def shutdown() -> None:
    """Called by gunicorn's worker_exit hook."""
    if _service is not None:
        _service.shutdown()
