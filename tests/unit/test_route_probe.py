"""The readiness route probe against a fake sequence manager: bans and failure streaks."""

from __future__ import annotations

import math
import time
from types import SimpleNamespace

import pytest
from hivemind.dht.node import Blacklist

from services.common.startup.config import Env
from services.inference.model import ModelHandle
from services.inference.settings import InferenceSettings


class FakeSequenceManager:
    """One block range held by one peer, whose pings answer as ``answers`` says (in turn)."""

    def __init__(self, answers: list[bool]) -> None:
        self.answers = answers
        self.banned = Blacklist(base_time=15.0, backoff_rate=2.0)
        self.dht = SimpleNamespace(run_coroutine=self._ping, shutdown=lambda: None)

    def make_sequence(self, mode: str) -> list[SimpleNamespace]:
        if "server-0" in self.banned:
            raise RuntimeError("No servers holding blocks 0")
        return [SimpleNamespace(peer_id="server-0")]

    def _ping(self, coroutine: object) -> dict[str, float]:
        return {"server-0": 0.01 if self.answers.pop(0) else math.inf}

    def on_request_failure(self, peer: str) -> None:
        self.banned.register_failure(peer)

    def on_request_success(self, peer: str) -> None:
        self.banned.register_success(peer)

    def shutdown(self) -> None:
        """ModelHandle.stop leaves the swarm: nothing to leave here."""


def handle_with(sequence_manager: FakeSequenceManager) -> ModelHandle:
    settings = InferenceSettings.from_env(Env({"MODEL": "/models/tiny-bloom"}))
    handle = ModelHandle(settings)
    handle.model = SimpleNamespace(transformer=SimpleNamespace(h=SimpleNamespace(sequence_manager=sequence_manager)))
    return handle


def test_an_answering_server_clears_its_failure_streak():
    sequence_manager = FakeSequenceManager(answers=[False, True, True])
    handle = handle_with(sequence_manager)
    with pytest.raises(RuntimeError, match="No servers holding blocks 0"):
        handle._probe_route()  # a late ping bans it; the next route has no server for block 0
    assert sequence_manager.banned.ban_counter["server-0"] == 1
    del sequence_manager.banned.banned_peers["server-0"]  # the ban expired
    handle._probe_route()
    assert sequence_manager.banned.ban_counter["server-0"] == 0  # the next ban is the first one again
    assert "server-0" not in sequence_manager.banned


def test_a_swarm_missing_blocks_is_checked_about_once_a_second_not_in_a_spin(monkeypatch):
    """With a block unserved, Petals fails the route at once; the readiness loop pauses between
    checks all the same (it once spun a core until the swarm recovered)."""
    handle = handle_with(FakeSequenceManager(answers=[]))
    checks = []

    def no_route() -> None:
        checks.append(1)
        raise RuntimeError("No servers holding blocks 0")

    monkeypatch.setattr(handle, "_probe_route", no_route)
    monkeypatch.setattr(handle, "_load", lambda: None)  # the model is there already
    handle.start()
    try:
        time.sleep(2.5)
    finally:
        handle.stop()
    assert 2 <= len(checks) <= 4, f"{len(checks)} route checks in 2.5 s"
    assert handle.readiness() == (False, "no route through the swarm (RuntimeError: No servers holding blocks 0)")
