"""Session lifecycle on a real service: expiry, the session limit, close, unknown ids, concurrency."""

from __future__ import annotations

import re
import threading
import time

import pytest
import requests
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from client.api import Api
from tests.helpers import metric_value, start_inference

EXPIRED = re.compile(r"Session .+ expired")  # what the original chat client matches


@pytest.fixture(scope="module")
def limited(swarm, model_dir, artifacts_dir):
    """A service with a 2 s session TTL and room for 3 sessions."""
    service = start_inference(
        swarm,
        model_dir,
        artifacts_dir,
        "inference-limited",
        SESSION_TTL_SECONDS="2",
        SESSION_REAPER_INTERVAL_SECONDS="0.5",
        MAX_SESSIONS="3",
    )
    yield Api(service.base_url)
    service.stop()


def test_idle_session_expires_and_use_refreshes_it(limited):
    kept, idle = limited.open_session(32), limited.open_session(32)
    assert limited.generate(inputs="Hello", max_new_tokens=1, session_id=kept)["ok"]
    for _ in range(4):  # 4 x 0.8 s = 3.2 s > TTL, but each use refreshes it
        time.sleep(0.8)
        assert limited.generate(max_new_tokens=1, session_id=kept)["ok"]
    body = limited.generate(inputs="Hello", max_new_tokens=1, session_id=idle)
    assert body["ok"] is False and EXPIRED.search(body["traceback"])
    limited.close_session(kept)
    metrics = limited.metrics()
    assert metric_value(metrics, 'petals_chat_sessions_closed_total{reason="expired"}') >= 1


def test_reaper_closes_expired_sessions(limited):
    before = metric_value(limited.metrics(), 'petals_chat_sessions_closed_total{reason="expired"}')
    limited.open_session(16)
    time.sleep(3.5)  # TTL 2 s + reaper interval 0.5 s, no request touching the session
    metrics = limited.metrics()
    assert metric_value(metrics, 'petals_chat_sessions_closed_total{reason="expired"}') == before + 1
    assert metric_value(metrics, "petals_chat_active_sessions") == 0


def test_session_limit_refuses_clearly_and_spares_existing_sessions(limited):
    sessions = [limited.open_session(32) for _ in range(3)]
    extra = requests.get(f"{limited.base_url}/api/v1/open_inference_session", params={"max_length": 32}).json()
    assert extra["ok"] is False
    assert "maximum of 3 sessions" in extra["traceback"]
    for session_id in sessions:
        assert limited.generate(inputs="Hi", max_new_tokens=2, session_id=session_id)["ok"]
    for session_id in sessions:
        assert limited.close_session(session_id) == {"ok": True}


def test_closed_session_is_gone(api):
    session_id = api.open_session(32)
    assert api.close_session(session_id) == {"ok": True}
    body = api.generate(inputs="Hi", max_new_tokens=1, session_id=session_id)
    assert body["ok"] is False and EXPIRED.search(body["traceback"])
    again = api.close_session(session_id)
    assert again["ok"] is False and EXPIRED.search(again["traceback"])


def test_unknown_session_matches_the_original_clients_pattern(api):
    body = api.generate(inputs="Hi", max_new_tokens=1, session_id="inference-0.doesnotexist")
    assert body == {"ok": False, "traceback": "Session inference-0.doesnotexist expired or does not exist"}


def test_concurrent_calls_on_one_session_never_interleave(api, oracle, decode_partial):
    prompt = "A human talks to a powerful AI"
    session_id = api.open_session(128)
    results: dict[str, dict] = {}

    def long_call() -> None:
        results["long"] = api.generate(inputs=prompt, max_new_tokens=100, session_id=session_id)

    worker = threading.Thread(target=long_call)
    worker.start()
    refusals = []
    while worker.is_alive() and not refusals:  # until a second call meets the long one generating
        second = Api(api.base_url).generate(max_new_tokens=1, session_id=session_id)
        assert second["ok"] is False  # busy, or (the long call not started yet) no tokens to continue
        if "is busy" in second["traceback"]:
            refusals.append(second)
        time.sleep(0.02)
    worker.join()
    assert refusals, "the long call ended before a second call reached the session"
    # The first call was not disturbed, and the session goes on exactly as the oracle says.
    expected = decode_partial(oracle(prompt, 101))
    assert results["long"]["ok"]
    follow_up = api.generate(max_new_tokens=1, session_id=session_id)
    assert (results["long"]["outputs"] + follow_up["outputs"]) == expected
    api.close_session(session_id)


def test_sigterm_drains_requests_and_closes_every_session(swarm, model_dir, artifacts_dir, tmp_path, oracle, decode):
    """A replica stopping (scale-down, rollout) finishes the answers in progress, then closes its
    Petals sessions (so the servers free their caches) and exits well within the grace period."""
    metrics_dir = tmp_path / "metrics"  # the counters outlive the process there
    metrics_dir.mkdir()
    service = start_inference(
        swarm, model_dir, artifacts_dir, "inference-shutdown", PROMETHEUS_MULTIPROC_DIR=str(metrics_dir)
    )
    api = Api(service.base_url)
    sessions = [api.open_session(32) for _ in range(3)]
    for session_id in sessions:
        assert api.generate(inputs="Hi", max_new_tokens=1, session_id=session_id)["ok"]
    streaming, answer = threading.Event(), {}

    def long_answer() -> None:
        _, events = Api(service.base_url).events({"inputs": "A long answer", "max_new_tokens": 40})
        for _, data in events:
            streaming.set()
            answer["last"] = data

    reader = threading.Thread(target=long_answer)
    reader.start()
    assert streaming.wait(30)
    started = time.monotonic()
    assert service.stop(timeout=60) == 0  # SIGTERM: gunicorn drains, then exits cleanly
    assert time.monotonic() - started < 30  # the chart's grace period is 90 s
    reader.join(10)
    assert answer["last"]["ok"] and answer["last"]["outputs"] == decode(oracle("A long answer", 40))
    log = service.log_path.read_text()
    for session_id in sessions:
        assert f"session {session_id} closed (shutdown)" in log
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(metrics_dir))
    closed = metric_value(generate_latest(registry).decode(), 'petals_chat_sessions_closed_total{reason="shutdown"}')
    assert closed == len(sessions)
