"""The WebSocket API (``/api/v2/generate``, chat.petals.dev's protocol) through the gateway, with a
real WebSocket client (the ``websockets`` library), against the real swarm.

A gateway and an inference replica of its own (so that the replica's session count and the
servers' attention caches are this module's to read), with a short idle timeout and a small
message limit. Greedy text must equal v1, v2 SSE and the in-process oracle; a session must be freed
whenever its connection ends; every error is a clear ``{"ok": false, "traceback"}`` message.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
import requests
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection

from client.api import Api, answers, ask, connect_ws
from client.probes import wait_until
from tests.helpers import DHT_PREFIX, Stack, SwarmProbe, dedicated_stack, metric_value, start_gateway

IDLE_TIMEOUT_S = 3
MESSAGE_LIMIT = 4096
GATEWAY_ENV = {"WS_IDLE_TIMEOUT_SECONDS": str(IDLE_TIMEOUT_S), "WS_MAX_MESSAGE_BYTES": str(MESSAGE_LIMIT)}


@pytest.fixture(scope="module")
def stack(swarm, model_dir, artifacts_dir) -> Iterator[Stack]:
    with dedicated_stack(swarm, model_dir, artifacts_dir, "websocket", gateway_env=GATEWAY_ENV) as running:
        yield running


@pytest.fixture(scope="module")
def probe(swarm, model_dir, artifacts_dir) -> Iterator[SwarmProbe]:
    blocks = json.loads((model_dir / "config.json").read_text())["n_layer"]
    running = SwarmProbe(swarm.initial_peers, DHT_PREFIX, blocks, artifacts_dir / "logs" / "swarm-probe-ws.log")
    yield running
    running.close()


def open_socket(stack: Stack, **kwargs) -> ClientConnection:
    return connect_ws(stack.gateway.port, **kwargs)


def opened(stack: Stack, max_length: int = 256, **kwargs) -> ClientConnection:
    ws = open_socket(stack, **kwargs)
    assert ask(ws, {"type": "open_inference_session", "max_length": max_length}) == {"ok": True}
    return ws


def active_sessions(stack: Stack) -> int:
    return requests.get(f"{stack.replicas[0].base_url}/readyz", timeout=10).json()["active_sessions"]


def replica_streams(stack: Stack) -> float:
    """Requests the replica's stream endpoint has answered (a WebSocket message's steps are one)."""
    text = requests.get(f"{stack.replicas[0].base_url}/metrics", timeout=10).text
    return metric_value(text, 'petals_chat_requests_total{endpoint="/api/v2/generate_stream",status="200"}')


def clean_boundary(tokenizer, decode, decode_partial, ids: list[int], start: int) -> int:
    """The first k >= start at which ids[:k] decodes to whole characters (no incomplete one held back)."""
    for k in range(start, len(ids)):
        text = decode(ids[:k])
        if decode_partial(ids[:k]) == text and len(text) >= 3:
            return k
    pytest.skip("no clean token boundary in this greedy text")


def test_the_successor_readme_example(stack, tokenizer):
    """chat.petals.dev's README: both messages sent at once, sampling up to max_length 30."""
    prompt, max_length = "A cat sat on", 30
    with open_socket(stack) as ws:
        ws.send(json.dumps({"type": "open_inference_session", "max_length": max_length}))  # the default model
        ws.send(json.dumps({"type": "generate", "inputs": prompt, "max_length": max_length, "do_sample": 1,
                            "temperature": 0.6, "top_p": 0.9}))  # fmt: skip
        assert json.loads(ws.recv(timeout=30)) == {"ok": True}
        answer = json.loads(ws.recv(timeout=60))
    prompt_tokens = len(tokenizer(prompt, add_special_tokens=False).input_ids)
    assert answer["ok"] and answer["stop"] is True and isinstance(answer["outputs"], str)
    assert 1 <= answer["token_count"] <= max_length - prompt_tokens
    assert set(answer) == {"ok", "outputs", "stop", "token_count"}


def test_the_model_can_be_named(stack, model_dir):
    with open_socket(stack) as ws:
        assert ask(ws, {"type": "open_inference_session", "model": model_dir.name, "max_length": 16}) == {"ok": True}
        answer = ask(ws, {"type": "generate", "inputs": "Hi", "max_new_tokens": 2, "model": model_dir.name})
        assert answer["ok"] and answer["token_count"] == 2


def test_greedy_text_equals_v1_v2_and_the_oracle(stack, oracle, decode_partial):
    prompt, n = "A human talks to a powerful AI", 20
    with opened(stack) as ws:
        answer = ask(ws, {"type": "generate", "inputs": prompt, "max_new_tokens": n})
    assert answer["ok"] and answer["stop"] and answer["token_count"] == n
    api = Api(stack.gateway.base_url)
    session_id = api.open_session(256)
    v1 = api.generate(inputs=prompt, max_new_tokens=n, session_id=session_id)["outputs"]
    api.close_session(session_id)
    session_id = api.open_session(256)
    status, events = Api(stack.gateway.base_url).stream({"inputs": prompt, "max_new_tokens": n,
                                                             "session_id": session_id})  # fmt: skip
    api.close_session(session_id)
    assert status == 200 and events[-1][0] == "done"
    assert answer["outputs"] == v1 == events[-1][1]["outputs"] == decode_partial(oracle(prompt, n))


def test_step_by_step_answers_end_at_the_stop_sequence(stack, tokenizer, oracle, decode, decode_partial):
    prompt = "Human: Hi! Can you tell me what Petals is?\n\nAI:"
    ids = oracle(prompt, 40)
    k = clean_boundary(tokenizer, decode, decode_partial, ids, 6)
    stop = decode(ids[:k])[-3:]
    while any(decode_partial(ids[:j]).endswith(stop) for j in range(1, k)):  # it must end the text at k first
        k = clean_boundary(tokenizer, decode, decode_partial, ids, k + 1)
        stop = decode(ids[:k])[-3:]
    with opened(stack) as ws:
        relayed_before = replica_streams(stack)
        ws.send(json.dumps({"type": "generate", "inputs": prompt, "max_new_tokens": 1, "stop_sequence": stop}))
        steps = answers(ws)
        assert wait_until(lambda: replica_streams(stack) > relayed_before, timeout=10)  # counted once closed
        assert replica_streams(stack) - relayed_before == 1  # the replica ran every step of the message
        assert all(step["ok"] for step in steps), steps
        assert [step["stop"] for step in steps] == [False] * (len(steps) - 1) + [True]
        text = "".join(step["outputs"] for step in steps)
        assert text == decode(ids[:k]) and text.endswith(stop)  # the stop sequence included, as the successor does
        assert sum(step["token_count"] for step in steps) == k and all(step["token_count"] >= 1 for step in steps)
        assert all(step["outputs"] for step in steps)  # text never split inside a character: no empty steps
        # The session goes on where the answer stopped.
        more = ask(ws, {"type": "generate", "max_new_tokens": 3})
        assert decode_partial(ids[: k + 3]) == text + more["outputs"]


def test_extra_stop_sequences_continue_as_if_the_stop_token_came(stack, tokenizer, oracle, decode, decode_partial):
    prompt = "The quick brown fox"
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    ids = oracle(prompt, 30)
    k = clean_boundary(tokenizer, decode, decode_partial, ids, 4)
    extra = decode(ids[:k])[-2:]
    while any(decode_partial(ids[:j]).endswith(extra) for j in range(1, k)):
        k = clean_boundary(tokenizer, decode, decode_partial, ids, k + 1)
        extra = decode(ids[:k])[-2:]
    eos = tokenizer.eos_token  # one token
    with opened(stack) as ws:
        message = {"type": "generate", "inputs": prompt, "max_new_tokens": 1, "stop_sequence": eos,
                   "extra_stop_sequences": [extra]}  # fmt: skip
        ws.send(json.dumps(message))
        steps = answers(ws)
        assert steps[-1]["stop"] and "".join(step["outputs"] for step in steps) == decode(ids[:k])
        continued = ask(ws, {"type": "generate", "max_new_tokens": 5})
    expected = oracle(prompt_ids + ids[: k - 1] + [tokenizer.eos_token_id], 5)
    assert continued["ok"] and continued["outputs"] == decode_partial(expected)


def test_a_full_session_ends_the_answer(stack, tokenizer):
    prompt = "Fill the session"
    prompt_tokens = len(tokenizer(prompt, add_special_tokens=False).input_ids)
    with opened(stack, max_length=prompt_tokens + 5) as ws:
        ws.send(json.dumps({"type": "generate", "inputs": prompt, "max_new_tokens": 1, "stop_sequence": "\x00never"}))
        steps = answers(ws)
        assert steps[-1]["ok"] and steps[-1]["stop"]
        assert sum(step["token_count"] for step in steps) == 5
        refused = ask(ws, {"type": "generate", "max_new_tokens": 1})
        assert refused["ok"] is False and "room for 0 more" in refused["traceback"]


def test_repetition_penalty_matches_transformers(stack, oracle, decode, decode_partial):
    prompt, n, penalty = "the the the the", 12, 1.8
    expected = oracle(prompt, n, repetition_penalty=penalty)
    assert expected != oracle(prompt, n), "pick a prompt where the penalty changes the text"
    api = Api(stack.gateway.base_url)
    assert api.generate(inputs=prompt, max_new_tokens=n, repetition_penalty=penalty)["outputs"] == decode(expected)
    with opened(stack) as ws:
        answer = ask(ws, {"type": "generate", "inputs": prompt, "max_new_tokens": n, "repetition_penalty": penalty})
    assert answer["outputs"] == decode_partial(expected)
    model = requests.get(f"{stack.gateway.base_url}/v1/models", timeout=10).json()["data"][0]["id"]
    body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "repetition_penalty": penalty}
    completion = requests.post(f"{stack.gateway.base_url}/v1/completions", json=body, timeout=60).json()
    assert completion["choices"][0]["text"] == decode(expected)
    refused = api.generate(inputs=prompt, max_new_tokens=1, repetition_penalty=0)
    assert refused["ok"] is False and "repetition_penalty must be at least 0.01" in refused["traceback"]


@pytest.mark.parametrize("how", ["close", "vanish"])
def test_a_disconnect_mid_answer_frees_the_session(stack, probe, how):
    baseline_sessions, baseline_cache = active_sessions(stack), probe.free()
    ws = opened(stack, max_length=512)
    ws.send(json.dumps({"type": "generate", "inputs": "A long answer", "max_new_tokens": 400}))
    assert wait_until(lambda: active_sessions(stack) == baseline_sessions + 1, timeout=10)
    assert wait_until(lambda: all(probe.free()[p] < t for p, t in baseline_cache.items()), timeout=20, interval=0.5)
    if how == "close":
        ws.close()  # a closing handshake
    else:
        ws.close_socket()  # the client vanishes: no close frame
    assert wait_until(lambda: active_sessions(stack) == baseline_sessions, timeout=10)
    freed = lambda: all(probe.free()[peer] >= tokens for peer, tokens in baseline_cache.items())  # noqa: E731
    assert wait_until(freed, timeout=15, interval=0.5), (probe.free(), baseline_cache)
    metrics = requests.get(f"{stack.replicas[0].base_url}/metrics", timeout=10).text
    assert metric_value(metrics, "petals_chat_active_sessions") == baseline_sessions
    gateway_metrics = requests.get(f"{stack.gateway.base_url}/metrics", timeout=10).text
    assert metric_value(gateway_metrics, "petals_chat_gateway_websocket_connections") == 0


def test_an_idle_connection_is_closed_and_its_session_freed(stack):
    baseline = active_sessions(stack)
    with opened(stack) as ws:
        assert active_sessions(stack) == baseline + 1
        started = time.monotonic()
        notice = json.loads(ws.recv(timeout=IDLE_TIMEOUT_S + 10))
        assert notice["ok"] is False and f"No message for {IDLE_TIMEOUT_S} s" in notice["traceback"]
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=10)
        assert ws.close_code == 1000 and IDLE_TIMEOUT_S - 0.5 < time.monotonic() - started < IDLE_TIMEOUT_S + 3
    assert wait_until(lambda: active_sessions(stack) == baseline, timeout=10)


def assert_clear(answer: dict, fragment: str) -> None:
    assert answer["ok"] is False and fragment in answer["traceback"], answer
    assert "Traceback" not in answer["traceback"] and 'File "' not in answer["traceback"]  # no stack frames


def test_errors_are_clear_and_leave_the_connection_usable(stack, model_dir):
    with open_socket(stack) as ws:
        assert_clear(ask(ws, {"type": "generate", "inputs": "Hi", "max_new_tokens": 1}), "Open a session first")
        assert_clear(ask(ws, "not json {"), "Message is not valid JSON")
        assert_clear(ask(ws, "[1, 2]"), "Message must be a JSON object")
        assert_clear(ask(ws, {"type": "chat"}), 'Message type must be "open_inference_session" or "generate"')
        ws.send(b"\x00\x01binary")
        assert_clear(json.loads(ws.recv(timeout=10)), "Messages must be JSON text; a binary message arrived")
        too_large = json.dumps({"type": "generate", "inputs": "x" * MESSAGE_LIMIT, "max_new_tokens": 1})
        assert_clear(ask(ws, too_large), f"the limit is {MESSAGE_LIMIT}")
        assert_clear(ask(ws, {"type": "open_inference_session"}), "max_length is required")
        unknown = ask(ws, {"type": "open_inference_session", "model": "gpt-4", "max_length": 16})
        assert_clear(unknown, f"The model 'gpt-4' is not served here; served: {model_dir.name}")
        assert ask(ws, {"type": "open_inference_session", "max_length": 16}) == {"ok": True}
        assert_clear(ask(ws, {"type": "open_inference_session", "max_length": 16}), "already holds a session")
        assert_clear(ask(ws, {"type": "generate", "inputs": "Hi", "max_new_tokens": 0}), "max_new_tokens must be")
        assert_clear(ask(ws, {"type": "generate", "inputs": "Hi"}), "Set exactly one of max_length or max_new_tokens")
        assert_clear(ask(ws, {"type": "generate", "inputs": "Hi", "max_new_tokens": 1, "stop": "x"}), "stop_sequence")
        assert_clear(ask(ws, {"type": "generate", "inputs": "Hi", "max_new_tokens": 1, "extra_stop_sequences": ["a"]}),
                     "extra_stop_sequences require stop_sequence")  # fmt: skip
        multi = {"type": "generate", "inputs": "Hi", "max_new_tokens": 1, "stop_sequence": "abc xyz",
                 "extra_stop_sequences": ["\n"]}  # fmt: skip
        assert_clear(ask(ws, multi), "require stop_sequence to be exactly one token")
        assert_clear(ask(ws, {"type": "generate", "max_new_tokens": 1}), "holds no tokens yet")
        full = ask(ws, {"type": "generate", "inputs": "Hi there", "max_new_tokens": 16})
        assert_clear(full, "Open a session with a larger max_length")
        other = ask(ws, {"type": "generate", "inputs": "Hi", "max_new_tokens": 1, "model": "gpt-4"})
        assert_clear(other, "The model 'gpt-4' is not served here")
        answer = ask(ws, {"type": "generate", "inputs": "Hi", "max_new_tokens": 2})  # still serving
        assert answer["ok"] and answer["token_count"] == 2


def test_a_message_during_a_generation_is_refused(stack):
    with opened(stack) as ws:
        ws.send(json.dumps({"type": "generate", "inputs": "Busy", "max_new_tokens": 30}))
        ws.send(json.dumps({"type": "generate", "max_new_tokens": 1}))
        first = json.loads(ws.recv(timeout=60))
        assert_clear(first, "A generation is running on this connection")
        answer = json.loads(ws.recv(timeout=60))
        assert answer["ok"] and answer["stop"] and answer["token_count"] == 30


def test_a_message_far_over_the_limit_closes_the_connection(stack):
    with opened(stack, max_size=None) as ws:
        ws.send(json.dumps({"type": "generate", "inputs": "x" * (5 * MESSAGE_LIMIT), "max_new_tokens": 1}))
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=10)
        assert ws.close_code == 1009  # message too big


def test_plain_http_gets_upgrade_required(stack):
    response = requests.get(f"{stack.gateway.base_url}/api/v2/generate", timeout=10)
    assert response.status_code == 426 and response.headers["Upgrade"] == "websocket"
    assert response.json()["error"]["code"] == "upgrade_required"


def test_origins_follow_cors_allow_origins(inference, artifacts_dir):
    gateway = start_gateway(artifacts_dir, {"inference-0": inference.base_url}, "gateway-ws-origins",
                            CORS_ALLOW_ORIGINS="https://chat.example")  # fmt: skip
    try:
        with connect_ws(gateway.port, origin="https://chat.example") as ws:
            assert ask(ws, {"type": "open_inference_session", "max_length": 8}) == {"ok": True}
        with pytest.raises(InvalidStatus) as refused:
            connect_ws(gateway.port, origin="https://evil.example")
        assert refused.value.response.status_code == 403
    finally:
        gateway.stop()
