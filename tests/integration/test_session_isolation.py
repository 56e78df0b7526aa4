"""Sessions belong to their client, and the limits that protect the swarm, against the real swarm.

One inference replica (at most one request without a session at a time, MAX_LENGTH_LIMIT above
what the tiny BLOOM's servers hold per session) behind two gateways: one with keys (alice, bob),
one without keys that trusts ``X-Forwarded-For`` (clients told apart by address). Every ownership
test runs against both. Clients: plain HTTP for v1 and v2, the ``openai`` package, ``websockets``.
"""

from __future__ import annotations

import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass

import openai
import pytest
import requests
from websockets.exceptions import ConnectionClosed

from client.api import Api, ask, connect_ws
from client.probes import wait_until
from tests.helpers import Stack, dedicated_stack, metric_value, start_gateway

ALICE, BOB = "alice-secret-key-7f3c9a21d4", "bob-secret-key-5e8b02c6f1a9"
MAX_LENGTH_LIMIT = 4096  # above the 2048 tokens a BLOOM's Petals server holds per session by default
SERVERS_MAX_LENGTH = 2048
OPEN = {"type": "open_inference_session", "max_length": 32}
GENERATE = {"type": "generate", "inputs": "Hi", "max_new_tokens": 1}
RELOAD_S = 0.5  # API_KEYS_RELOAD_SECONDS of the gateway whose key file is rotated


@pytest.fixture(scope="module")
def stack(swarm, model_dir, artifacts_dir) -> Iterator[Stack]:
    shared, keys = {"MAX_LENGTH_LIMIT": str(MAX_LENGTH_LIMIT)}, {"API_KEYS": f"alice:{ALICE} bob:{BOB}"}
    with dedicated_stack(swarm, model_dir, artifacts_dir, "isolation", shared_env=shared, gateway_env=keys,
                         inference_env={"MAX_SESSIONLESS_REQUESTS": "1"}) as running:  # fmt: skip
        yield running


@pytest.fixture(scope="module")
def address_gateway(stack, artifacts_dir) -> Iterator[str]:
    """The same replica behind a gateway without keys, behind a (pretended) trusted proxy."""
    replica = stack.replicas[0]
    service = start_gateway(artifacts_dir, {replica.name: replica.base_url}, "isolation-addresses",
                            TRUSTED_PROXIES="127.0.0.1", MAX_LENGTH_LIMIT=str(MAX_LENGTH_LIMIT))  # fmt: skip
    yield service.base_url
    service.stop()


@dataclass(frozen=True)
class Clients:
    """A gateway and the headers of two of its clients: a session's owner and another client."""

    name: str
    url: str
    owner: dict[str, str]
    other: dict[str, str]

    def api(self, headers: dict[str, str]) -> Api:
        return Api(self.url, headers=headers)

    def openai(self, headers: dict[str, str]) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", default_headers=headers, max_retries=0,
                             timeout=60)  # fmt: skip


@pytest.fixture(scope="module", params=["keys", "addresses"])
def clients(request, stack, address_gateway) -> Clients:
    if request.param == "keys":
        return Clients("keys", stack.gateway.base_url, bearer(ALICE), bearer(BOB))
    return Clients("addresses", address_gateway, {"X-Forwarded-For": "192.0.2.1"}, {"X-Forwarded-For": "192.0.2.2"})


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def unknown(session_id: str) -> str:
    return f"Session {session_id} expired or does not exist"


def made_up(session_id: str) -> str:
    """An id of the same replica that no session has."""
    return session_id.rpartition(".")[0] + ".no-such-session-0123456789"


def closed_sessions(stack: Stack, reason: str) -> float:
    text = requests.get(f"{stack.replicas[0].base_url}/metrics", timeout=10).text
    return metric_value(text, f'petals_chat_sessions_closed_total{{reason="{reason}"}}')


# ---- ownership -------------------------------------------------------------------------------


def test_v1_another_clients_session_answers_as_an_unknown_one(clients):
    owner, other = clients.api(clients.owner), clients.api(clients.other)
    session_id = owner.open_session(64)
    nobodys = made_up(session_id)
    missing = other.generate(session_id=nobodys, inputs="Hi", max_new_tokens=1)
    assert missing == {"ok": False, "traceback": unknown(nobodys)}
    for answer in (
        other.generate(session_id=session_id, inputs="Hi", max_new_tokens=1),
        other.generate(session_id=session_id, max_new_tokens=1),
        other.close_session(session_id),
    ):
        assert answer == {"ok": False, "traceback": unknown(session_id)}
    assert owner.generate(session_id=session_id, inputs="Hi", max_new_tokens=1)["ok"]  # neither used nor closed
    assert owner.close_session(session_id) == {"ok": True}


def test_v2_stream_in_another_clients_session_is_the_404_of_an_unknown_one(clients):
    owner, other = clients.api(clients.owner), clients.api(clients.other)
    session_id = owner.open_session(64)
    for tried in (made_up(session_id), session_id):
        status, events = other.stream({"session_id": tried, "inputs": "Hi", "max_new_tokens": 1})
        assert status == 404
        assert events == [("json", {"ok": False, "error": {"code": "session_not_found", "message": unknown(tried)}})]
    status, events = owner.stream({"session_id": session_id, "inputs": "Hi", "max_new_tokens": 1})
    assert status == 200 and events[-1][0] == "done"
    owner.close_session(session_id)


def test_websocket_sessions_are_their_connections_clients(clients):
    port = urllib.parse.urlsplit(clients.url).port
    with connect_ws(port, additional_headers=clients.owner) as ws:
        assert ask(ws, OPEN) == {"ok": True}
        for _ in range(2):
            assert ask(ws, GENERATE)["ok"]


def test_openai_conversations_are_continued_only_by_their_client(clients, model_dir):
    model, owner, other = model_dir.name, clients.openai(clients.owner), clients.openai(clients.other)
    first_turn = [{"role": "user", "content": f"Whose conversation is this ({clients.name})?"}]
    first = owner.chat.completions.create(model=model, messages=first_turn, max_tokens=6, temperature=0)
    reply = {"role": "assistant", "content": first.choices[0].message.content}
    follow_up = [*first_turn, reply, {"role": "user", "content": "And then?"}]
    theirs = other.chat.completions.create(model=model, messages=follow_up, max_tokens=6, temperature=0)
    assert theirs.usage.prompt_tokens_details.cached_tokens == 0
    mine = owner.chat.completions.create(model=model, messages=follow_up, max_tokens=6, temperature=0)
    assert mine.usage.prompt_tokens_details.cached_tokens == first.usage.total_tokens > 0


def test_a_removed_keys_sessions_end(stack, artifacts_dir):
    """A gateway reading API_KEYS_FILE: once alice's key is removed, her sessions are closed on the
    replica and her WebSocket connection ends at its next message (1008)."""
    keys_dir = artifacts_dir / "isolation-keys"
    keys_dir.mkdir(exist_ok=True)
    path = keys_dir / "keys"
    path.write_text(f"alice:{ALICE}\nbob:{BOB}\n")
    replica = stack.replicas[0]
    env = {"API_KEYS_FILE": str(path), "API_KEYS_RELOAD_SECONDS": str(RELOAD_S)}
    service = start_gateway(artifacts_dir, {replica.name: replica.base_url}, "isolation-rotated", **env)
    alice, bob = Api(service.base_url, headers=bearer(ALICE)), Api(service.base_url, headers=bearer(BOB))
    try:
        session_id = alice.open_session(64)
        with connect_ws(urllib.parse.urlsplit(service.base_url).port, additional_headers=bearer(ALICE)) as ws:
            assert ask(ws, OPEN) == {"ok": True} and ask(ws, GENERATE)["ok"]
            revoked_before = closed_sessions(stack, "revoked")
            new = keys_dir / "keys.new"
            new.write_text(f"bob:{BOB}\n")
            new.replace(path)
            assert wait_until(lambda: closed_sessions(stack, "revoked") >= revoked_before + 2, 15), service.log_tail()
            # The worker that closed them may not be the connection's: each worker reads the key file
            # again within API_KEYS_RELOAD_SECONDS of its last look, which is all a removal promises.
            time.sleep(2 * RELOAD_S)
            answer = ask(ws, GENERATE)
            assert answer["ok"] is False and "no longer valid" in answer["traceback"]
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=10)
            assert closed.value.rcvd.code == 1008
        assert "key" in alice.generate(session_id=session_id, inputs="Hi", max_new_tokens=1)["traceback"]
        assert bob.generate(session_id=session_id, inputs="Hi", max_new_tokens=1)["traceback"] == unknown(session_id)
    finally:
        service.stop()


# ---- limits that protect the swarm -----------------------------------------------------------


def test_requests_without_a_session_are_limited_per_replica(stack, model_dir):
    """MAX_SESSIONLESS_REQUESTS=1: while one runs, the next is refused at once with Retry-After, in
    each API's error shape; requests in sessions go on; once it ends, the next is served."""
    base, headers = stack.gateway.base_url, bearer(ALICE)
    holding = requests.post(f"{base}/api/v2/generate_stream", json={"inputs": "Hi", "max_new_tokens": 400},
                            headers=headers, stream=True, timeout=120)  # fmt: skip
    try:
        assert holding.status_code == 200
        next(holding.iter_lines())  # generating
        v2 = requests.post(f"{base}/api/v2/generate_stream", json={"inputs": "Hi", "max_new_tokens": 1},
                           headers=headers, timeout=30)  # fmt: skip
        assert v2.status_code == 503 and v2.headers["Retry-After"] == "1", v2.text
        assert v2.json()["error"]["code"] == "too_many_sessions"
        assert "MAX_SESSIONLESS_REQUESTS" in v2.json()["error"]["message"]
        v1 = requests.post(f"{base}/api/v1/generate", data={"inputs": "Hi", "max_new_tokens": 1}, headers=headers,
                           timeout=30)  # fmt: skip
        assert v1.status_code == 200 and v1.json()["ok"] is False and v1.headers["X-Petals-Chat-Status"] == "503"
        assert v1.headers["Retry-After"] == "1"
        body = {"model": model_dir.name, "prompt": "Hi", "max_tokens": 1}
        completion = requests.post(f"{base}/v1/completions", json=body, headers=headers, timeout=30)
        assert completion.status_code == 503 and completion.headers["Retry-After"] == "1"
        assert completion.json()["error"]["code"] == "too_many_sessions"
        api = Api(base, headers=headers)
        session_id = api.open_session(32)
        assert api.generate(session_id=session_id, inputs="Hi", max_new_tokens=1)["ok"]
        api.close_session(session_id)
    finally:
        holding.close()  # the replica stops generating and frees the slot
    served = lambda: requests.post(f"{base}/api/v1/generate", data={"inputs": "Hi", "max_new_tokens": 1},  # noqa: E731
                                   headers=headers, timeout=30).json()["ok"]  # fmt: skip
    assert wait_until(served, 15)


def test_n_choices_count_toward_the_replicas_limit_on_requests_without_a_session(stack, model_dir):
    """Each of ``n`` choices is a generation without a session: with MAX_SESSIONLESS_REQUESTS=1, ``n=2``
    is refused as a whole (503, Retry-After, OpenAI's shape), the choice that started is stopped, and
    the slot serves the next request."""
    base, headers = stack.gateway.base_url, bearer(ALICE)
    body = {"model": model_dir.name, "prompt": "Hi", "max_tokens": 1000, "n": 2, "temperature": 1, "seed": 1}
    refused = requests.post(f"{base}/v1/completions", json=body, headers=headers, timeout=60)
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1", refused.text
    assert refused.json()["error"]["code"] == "too_many_sessions"
    single = {**body, "n": 1, "max_tokens": 2}
    served = lambda: requests.post(f"{base}/v1/completions", json=single, headers=headers, timeout=30).ok  # noqa: E731
    assert wait_until(served, 30)


def test_max_length_is_bounded_by_what_the_models_servers_hold(stack, model_dir):
    base, headers = stack.gateway.base_url, bearer(ALICE)
    over = SERVERS_MAX_LENGTH + 1
    refused = requests.get(f"{base}/api/v1/open_inference_session", params={"max_length": over}, headers=headers,
                           timeout=30)  # fmt: skip
    assert refused.json()["ok"] is False and refused.headers["X-Petals-Chat-Status"] == "400"
    assert f"exceeds the limit of {SERVERS_MAX_LENGTH} tokens" in refused.json()["traceback"]
    assert "MODEL_MAX_LENGTH" in refused.json()["traceback"]
    v2 = requests.post(f"{base}/api/v2/generate_stream", json={"inputs": "Hi", "max_length": over}, headers=headers,
                       timeout=30)  # fmt: skip
    assert v2.status_code == 400 and f"limit of {SERVERS_MAX_LENGTH} tokens" in v2.json()["error"]["message"]
    with connect_ws(urllib.parse.urlsplit(base).port, additional_headers=headers) as ws:
        answer = ask(ws, {**OPEN, "max_length": over})
        assert answer["ok"] is False and f"limit of {SERVERS_MAX_LENGTH} tokens" in answer["traceback"]
        assert ask(ws, {**OPEN, "max_length": SERVERS_MAX_LENGTH}) == {"ok": True}
    models = requests.get(f"{base}/v1/models", headers=headers, timeout=10).json()["data"]
    assert [model["max_length"] for model in models if model["id"] == model_dir.name] == [SERVERS_MAX_LENGTH]
