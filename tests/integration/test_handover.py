"""Sessions survive a planned stop: a rolling restart of every replica of a model loses none.

Real processes on loopback: two inference replicas of the test model that hand their sessions to
each other on SIGTERM (``HANDOVER_TOKEN``), and a gateway with two workers; the gateway and the
replicas find the replicas in a discovery file (``INFERENCE_DISCOVERY=file://``), as ``make run``'s.
While 20 sessions converse (v1 one token per request, WebSocket, OpenAI chat with conversation
reuse; greedy), each replica in turn gets SIGTERM, exits and starts again, as a StatefulSet's
rolling update does: every request is answered, and each session's text equals an uninterrupted
run's (the oracle for v1 and the WebSocket, the same conversation run again afterwards for chat).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
import requests

from client.api import Api, connect_ws
from deploy.local_stack import ServiceProcess, discovery_env, handover_env, pick_free_port, write_discovery_file
from tests.conversations import ChatSession, SocketSession, V1Session
from tests.helpers import metric_value, start_gateway, start_inference

TOKEN = "test-handover-token-0123456789"
V1_SESSIONS, WS_SESSIONS, CHAT_SESSIONS = 8, 6, 6
PACE_S = {"v1": 0.3, "ws": 0.6, "chat": 2.0}  # between a session's requests: they go on across the restart


@pytest.fixture(scope="module")
def replicas_file(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("handover") / "inference-replicas.txt"


@pytest.fixture(scope="module")
def replicas(swarm, model_dir, artifacts_dir, replicas_file) -> Iterator[list[ServiceProcess]]:
    peers = {f"elastic-{index}": f"http://127.0.0.1:{pick_free_port()}" for index in range(2)}
    write_discovery_file(replicas_file, peers)
    env = {**handover_env(replicas_file, TOKEN), "HANDOVER_LINGER_SECONDS": "2"}
    started: list[ServiceProcess] = []
    try:
        for name, url in peers.items():
            port = int(url.rpartition(":")[2])
            started.append(start_inference(swarm, model_dir, artifacts_dir, name, port=port, **env))
        yield started
    finally:
        for service in started:
            service.stop()


@pytest.fixture(scope="module")
def gateway(replicas, artifacts_dir, replicas_file) -> Iterator[ServiceProcess]:
    service = start_gateway(artifacts_dir, {}, "elastic-gateway", **discovery_env(replicas_file))
    yield service
    service.stop()


def test_adopting_needs_the_token(replicas):
    url = replicas[0].base_url + "/internal/adopt_session"
    body = {"session_id": "elastic-1.stolen", "model": "x", "max_length": 8, "token_ids": [1], "idle_s": 0}
    for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": TOKEN}):
        answer = requests.post(url, json=body, headers=headers, timeout=10)
        assert answer.status_code == 401, answer.text
    answer = requests.post(url, json={**body, "token_ids": [10**9]}, headers=_bearer(), timeout=10)
    assert answer.status_code == 400 and "token ids" in answer.json()["error"]["message"]


def test_a_rolling_restart_loses_no_session(replicas, gateway, model_dir, oracle, tokenizer, decode_partial):
    base, stop = gateway.base_url, threading.Event()
    log_starts = [replica.log_path.stat().st_size for replica in replicas]
    chat = openai.OpenAI(base_url=f"{base}/v1", api_key="not-needed", max_retries=0, timeout=120)
    runs = [V1Session(Api(base), f"Session {index}: Human: hello", PACE_S["v1"]) for index in range(V1_SESSIONS)]
    runs += [
        SocketSession(connect_ws(gateway.port), f"Socket {index}: Human: hi there", PACE_S["ws"], f"ws-{index}")
        for index in range(WS_SESSIONS)
    ]
    runs += [ChatSession(chat, model_dir.name, index, PACE_S["chat"]) for index in range(CHAT_SESSIONS)]
    for run in runs:
        run.begin()
    holders = {run.holder() for run in runs if run.holder()}
    assert holders == {"elastic-0", "elastic-1"}, "sessions must start on both replicas"
    with ThreadPoolExecutor(len(runs)) as pool:
        futures = [pool.submit(run.converse, stop) for run in runs]
        for replica in replicas:  # a rolling restart: one at a time, each back before the next
            assert replica.stop(timeout=60) == 0, replica.log_tail()
            replica.start_ready(timeout=180)
        stop.set()
        for future in futures:
            future.result()
    for run in runs:
        run.end()
    uninterrupted = Uninterrupted(oracle, tokenizer, decode_partial, chat)
    for run in runs:
        assert run.steps >= 3, f"{run} did not go on across the restart"
        assert run.text() == run.reference(uninterrupted), run
    logs = b"".join(r.log_path.read_bytes()[start:] for r, start in zip(replicas, log_starts, strict=True)).decode()
    assert re.findall(r"; (\d+) could not be", logs) == ["0", "0"], "every session was handed over"
    decisions = requests.get(f"{base}/metrics", timeout=10).text
    adopted = 'petals_chat_gateway_routing_decisions_total{decision="adopted",replica="elastic-1"}'
    assert metric_value(decisions, adopted) > 0, "the gateway routed handed-over sessions to their adopter"


@dataclass(frozen=True)
class Uninterrupted:
    """What an uninterrupted run produces: the oracle's greedy tokens, and the stack's own chat."""

    oracle: Callable
    tokenizer: Any
    decode_partial: Callable
    chat: openai.OpenAI

    def text(self, prompt: str, tokens: int) -> str:
        """The text of ``tokens`` greedy tokens after ``prompt``, going on after an end-of-sequence
        token as a session does (the next request sends it)."""
        prompt_ids, generated = self.tokenizer(prompt, add_special_tokens=False).input_ids, []
        while len(generated) < tokens:
            generated += self.oracle([*prompt_ids, *generated], tokens - len(generated))
        return self.decode_partial(generated)


def _bearer() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}
