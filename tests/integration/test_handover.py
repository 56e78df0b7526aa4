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

from client.api import Api, ask, connect_ws
from deploy.local_stack import ServiceProcess, discovery_env, handover_env, pick_free_port, write_discovery_file
from tests.helpers import metric_value, start_gateway, start_inference

TOKEN = "test-handover-token-0123456789"
V1_SESSIONS, WS_SESSIONS, CHAT_SESSIONS = 8, 6, 6
PACE_S = {"v1": 0.3, "ws": 0.6, "chat": 2.0}  # between a session's requests: they go on across the restart
SESSION_TOKENS, MOST_TOKENS = 512, 480  # a session's size, and where its client stops asking


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
    runs = [V1Session(base, index) for index in range(V1_SESSIONS)]
    runs += [SocketSession(gateway.port, index) for index in range(WS_SESSIONS)]
    runs += [ChatSession(chat, model_dir.name, index) for index in range(CHAT_SESSIONS)]
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


class V1Session:
    """A v1 session generating one token per request."""

    def __init__(self, base: str, index: int) -> None:
        self.api, self.prompt = Api(base), f"Session {index}: Human: hello"
        self.outputs: list[str] = []
        self.session_id = ""

    def __repr__(self) -> str:
        return f"v1 {self.session_id} after {self.steps} tokens: {self.text()!r}"

    @property
    def steps(self) -> int:
        return len(self.outputs)

    def begin(self) -> None:
        self.session_id = self.api.open_session(SESSION_TOKENS)
        self.outputs.append(self.api.call("POST", "generate", self._fields(inputs=self.prompt))["outputs"])

    def holder(self) -> str:
        return self.session_id.rpartition(".")[0]

    def converse(self, stop: threading.Event) -> None:
        while not stop.wait(PACE_S["v1"]) and self.steps < MOST_TOKENS:
            self.outputs.append(self.api.call("POST", "generate", self._fields())["outputs"])

    def _fields(self, **extra: str) -> dict:
        return {"session_id": self.session_id, "max_new_tokens": 1, **extra}

    def end(self) -> None:
        assert self.api.close_session(self.session_id) == {"ok": True}

    def text(self) -> str:
        return "".join(self.outputs)

    def reference(self, uninterrupted: Uninterrupted) -> str:
        return uninterrupted.text(self.prompt, self.steps)


class SocketSession(V1Session):
    """A WebSocket session asking two tokens per ``generate`` message."""

    def __init__(self, port: int, index: int) -> None:
        self.ws, self.prompt = connect_ws(port), f"Socket {index}: Human: hi there"
        self.outputs, self.token_counts = [], []
        self.session_id = f"ws-{index}"

    @property
    def steps(self) -> int:
        return sum(self.token_counts)

    def begin(self) -> None:
        assert ask(self.ws, {"type": "open_inference_session", "max_length": SESSION_TOKENS}) == {"ok": True}
        self._generate(inputs=self.prompt)

    def holder(self) -> str:
        return ""  # the connection keeps its session id to itself

    def converse(self, stop: threading.Event) -> None:
        while not stop.wait(PACE_S["ws"]) and self.steps < MOST_TOKENS:
            self._generate()

    def _generate(self, **extra: str) -> None:
        answer = ask(self.ws, {"type": "generate", "max_new_tokens": 2, **extra})
        assert answer["ok"], answer
        self.outputs.append(answer["outputs"])
        self.token_counts.append(answer["token_count"])  # fewer than 2 when the model ends the text

    def end(self) -> None:
        self.ws.close()


class ChatSession:
    """An OpenAI chat conversation, one user message per turn, answers kept in the messages."""

    def __init__(self, client: openai.OpenAI, model: str, index: int) -> None:
        self.client, self.model, self.index = client, model, index
        self.messages: list[dict[str, str]] = [{"role": "system", "content": f"You are assistant {index}."}]
        self.answers: list[str] = []
        self.cached: list[int] = []

    def __repr__(self) -> str:
        return f"chat {self.index}: {self.answers} (cached prompt tokens per turn: {self.cached})"

    @property
    def steps(self) -> int:
        return len(self.answers)

    def begin(self) -> None:
        self._turn(self.messages, self.answers, self.cached)

    def holder(self) -> str:
        return ""

    def converse(self, stop: threading.Event) -> None:
        while not stop.wait(PACE_S["chat"]):
            self._turn(self.messages, self.answers, self.cached)

    def end(self) -> None:
        """Nothing to close: a conversation session expires."""

    def text(self) -> str:
        """The answers, and the prompt tokens each turn found in the conversation's session: the
        same as without a restart, so the conversation went on in its session where it had moved."""
        return f"{self.answers} {self.cached}"

    def reference(self, uninterrupted: Uninterrupted) -> str:
        """The same conversation again, with no restart meanwhile."""
        again = ChatSession(uninterrupted.chat, self.model, self.index)
        for _turn in range(self.steps):
            again.begin()
        return again.text()

    def _turn(self, messages: list[dict], answers: list[str], cached: list[int]) -> None:
        messages.append({"role": "user", "content": f"Question {len(answers)}?"})
        answer = self.client.chat.completions.create(model=self.model, messages=messages, max_tokens=3, temperature=0)
        text = answer.choices[0].message.content
        messages.append({"role": "assistant", "content": text})
        answers.append(text)
        cached.append(answer.usage.prompt_tokens_details.cached_tokens)
