"""A request id end to end: a real gateway and replica (access logs on), against the real swarm.

The gateway answers with the client's ``X-Request-Id`` (or one it made), sends it to the replica
on each call it makes for the request, and both services' log lines about the request name it:
for an answer, an error answered by the replica, and a WebSocket connection's messages.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import pytest
import requests

from client.api import ask, connect_ws
from client.probes import wait_until
from deploy.local_stack import ServiceProcess
from tests.helpers import Stack, dedicated_stack

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(swarm, model_dir, artifacts_dir) -> Iterator[Stack]:
    with dedicated_stack(swarm, model_dir, artifacts_dir, "request-id", shared_env={"ACCESS_LOG": "1"}) as running:
        yield running


def new_lines(service: ServiceProcess) -> Callable[[], str]:
    """What ``service`` logs from now on (its log file is kept from earlier runs)."""
    start = service.log_path.stat().st_size
    return lambda: service.log_path.read_bytes()[start:].decode(errors="replace")


def logged(lines: Callable[[], str], *parts: str) -> bool:
    """Whether a line holding every one of ``parts`` is logged within a few seconds."""
    return wait_until(lambda: any(all(part in line for part in parts) for line in lines().splitlines()), timeout=10)


def test_the_id_crosses_from_the_client_to_the_replica_and_back(stack):
    gateway_log, replica_log = new_lines(stack.gateway), new_lines(stack.replicas[0])
    body = {"inputs": "A request id", "max_new_tokens": 2}
    response = requests.post(f"{stack.gateway.base_url}/api/v1/generate", json=body,
                             headers={"X-Request-Id": "abc-123"}, timeout=60)  # fmt: skip
    assert response.json()["ok"] is True and response.headers["X-Request-Id"] == "abc-123"
    assert logged(gateway_log, '"POST /api/v1/generate', "request_id=abc-123")
    assert logged(replica_log, '"POST /api/v1/generate', "request_id=abc-123")


def test_a_missing_or_invalid_id_is_replaced_by_the_gateways_own(stack):
    replica_log = new_lines(stack.replicas[0])
    for headers in ({}, {"X-Request-Id": "not valid"}, {"X-Request-Id": "x" * 129}):
        response = requests.get(f"{stack.gateway.base_url}/api/v1/open_inference_session",
                                params={"max_length": 16}, headers=headers, timeout=30)  # fmt: skip
        request_id = response.headers["X-Request-Id"]
        assert response.json()["ok"] is True and re.fullmatch(r"[0-9a-f]{32}", request_id), response.headers
        assert logged(replica_log, '"GET /api/v1/open_inference_session', f"request_id={request_id}")


def test_an_error_answered_by_the_replica_names_the_same_id_in_both_logs(stack):
    gateway_log, replica_log = new_lines(stack.gateway), new_lines(stack.replicas[0])
    session_id = f"{stack.replicas[0].name}.no-such-session"  # routed to the replica, which holds no such session
    response = requests.post(f"{stack.gateway.base_url}/api/v1/generate", json={"session_id": session_id,
                             "max_new_tokens": 1}, headers={"X-Request-Id": "fail-456"}, timeout=30)  # fmt: skip
    assert response.json() == {"ok": False, "traceback": f"Session {session_id} expired or does not exist"}
    assert response.headers["X-Petals-Chat-Error"] == "session_not_found"
    assert response.headers["X-Request-Id"] == "fail-456"
    assert logged(replica_log, '"POST /api/v1/generate', "request_id=fail-456")  # the replica's refusal
    assert logged(gateway_log, '"POST /api/v1/generate', "request_id=fail-456")


def test_a_websocket_connection_sends_its_handshakes_id_with_every_message(stack):
    replica_log = new_lines(stack.replicas[0])
    with connect_ws(stack.gateway.port, additional_headers={"X-Request-Id": "ws-789"}) as ws:
        assert ws.response.headers["X-Request-Id"] == "ws-789"
        assert ask(ws, {"type": "open_inference_session", "max_length": 32})["ok"] is True
        for _ in range(2):
            answer = ask(ws, {"type": "generate", "inputs": "Hi", "max_new_tokens": 1})
            assert answer["ok"] is True and answer["stop"] is True, answer
    assert logged(replica_log, '"GET /api/v1/open_inference_session', "request_id=ws-789")
    assert logged(replica_log, '"POST /api/v2/generate_stream', "request_id=ws-789")
    assert logged(replica_log, '"GET /api/v1/close_inference_session', "request_id=ws-789")
    steps = [line for line in replica_log().splitlines() if "generate_stream" in line and "request_id=ws-789" in line]
    assert len(steps) >= 2  # both messages
