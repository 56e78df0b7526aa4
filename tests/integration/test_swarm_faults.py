"""Swarm faults on a dedicated swarm: a server dying mid-answer, then the whole swarm down and back.

The swarm starts with one server holding every block (A); a session starts there; a second
full server (B) joins; then A is SIGKILLed while the session is generating. Petals 2.2 cannot
carry its own kind of session over ("Broken input cache"; the replica's grouped sessions, off here, can:
test_batching_faults.py), so the inference service rebuilds it on B
and the stream goes on: its text must equal the in-process oracle. Then B dies too (the swarm
is gone: readiness false, quick "temporarily unavailable" answers), and A comes back on its old
address: the service recovers by itself.
"""

from __future__ import annotations

import time

import pytest
import requests

from client.api import Api
from services.swarm.launcher import PrivateSwarm
from tests.helpers import metric_value, start_inference

PROMPT = "Petals servers come and go, and the chat"
DHT_PREFIX = "petals-chat-faults"


@pytest.fixture(scope="module")
def fault_swarm(model_dir, artifacts_dir):
    with PrivateSwarm(model_dir, ["0:4"], artifacts_dir / "fault-swarm", dht_prefix=DHT_PREFIX) as swarm:
        yield swarm


@pytest.fixture(scope="module")
def service(fault_swarm, model_dir, artifacts_dir):
    service = start_inference(
        fault_swarm,
        model_dir,
        artifacts_dir,
        "inference-faults",
        DHT_PREFIX=DHT_PREFIX,
        SWARM_UPDATE_PERIOD_SECONDS="1",
        SWARM_MAX_RETRIES="3",
        REPLICA_STEP_BATCHING="false",  # Petals' own sessions, which the service rebuilds (test_batching_faults.py:
    )  # grouped ones, which Petals' client carries over by itself)
    yield service
    service.stop()


def wait_for(condition, timeout: float, what: str) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"{what} not within {timeout} s"
        time.sleep(0.25)
    return time.monotonic() - started


def ready(service) -> bool:
    return requests.get(f"{service.base_url}/readyz", timeout=5).status_code == 200


def test_session_survives_its_server_dying_mid_answer(fault_swarm, service, oracle, decode):
    api = Api(service.base_url)
    session_id = api.open_session(128)
    first = api.generate(inputs=PROMPT, max_new_tokens=4, session_id=session_id)["outputs"]
    server_a = fault_swarm.servers[0]
    fault_swarm.add_server("0:4")  # B: a second full copy of the model
    time.sleep(3)  # the client refreshes its view of the swarm every second
    rebuilds = metric_value(api.metrics(), "petals_chat_session_rebuilds_total")

    def kill_a_after_five_tokens(count: int) -> None:
        if count == 5:
            server_a.kill()

    body = {"session_id": session_id, "max_new_tokens": 40}
    done = Api(service.base_url, timeout_s=180).stream_text(body, kill_a_after_five_tokens)
    assert done["event"] == "done", done
    assert server_a.process.poll() is not None, "server A was killed mid-answer"
    assert first + done["outputs"] == decode(oracle(PROMPT, 44))
    assert metric_value(api.metrics(), "petals_chat_session_rebuilds_total") >= rebuilds + 1
    # The rebuilt session goes on as if nothing happened.
    more = api.generate(max_new_tokens=3, session_id=session_id)["outputs"]
    assert first + done["outputs"] + more == decode(oracle(PROMPT, 47))
    api.close_session(session_id)


def test_swarm_down_then_back(fault_swarm, service, oracle, decode):
    api = Api(service.base_url)
    for server in fault_swarm.servers:
        server.kill()
    wait_for(lambda: not ready(service), 30, "readiness false")
    started = time.monotonic()
    body = api.generate(inputs=PROMPT, max_new_tokens=2)
    assert time.monotonic() - started < 2
    assert body["ok"] is False and "Temporarily unavailable" in body["traceback"]
    response = requests.post(f"{service.base_url}/api/v2/generate_stream", json={"inputs": "x", "max_new_tokens": 1})
    assert response.status_code == 503 and response.headers["Retry-After"]

    fault_swarm.restart(0)  # A again, on its old address
    wait_for(lambda: ready(service), 120, "readiness back")
    assert api.generate(inputs=PROMPT, max_new_tokens=6)["outputs"] == decode(oracle(PROMPT, 6))
