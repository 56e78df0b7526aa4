"""The gateway routes every session to the replica holding it, with no shared store.

Real processes on loopback: one swarm, two dedicated inference replicas, two gateways (two
gunicorn workers each). The destructive test (killing a replica) runs last.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import requests

from client.api import Api
from deploy.local_stack import ServiceProcess
from tests.helpers import CHATML_DESCRIPTION, CHATML_MODEL, start_gateway, start_inference


@pytest.fixture(scope="module")
def replicas(swarm, model_dir, artifacts_dir) -> Iterator[dict[str, ServiceProcess]]:
    services = {}
    try:
        for name in ("inference-1", "inference-2"):
            services[name] = start_inference(swarm, model_dir, artifacts_dir, name)
        yield services
    finally:
        for service in services.values():
            service.stop()


@pytest.fixture(scope="module")
def gateways(replicas, chatml_inference, artifacts_dir) -> Iterator[list[ServiceProcess]]:
    """Two gateways in front of both replicas of the default model and the one of a second model."""
    urls = {name: service.base_url for name, service in replicas.items()}
    urls[chatml_inference.name] = chatml_inference.base_url
    started = []
    try:
        for name in ("gateway-a", "gateway-b"):
            started.append(start_gateway(artifacts_dir, urls, name))
        yield started
    finally:
        for gateway in started:
            gateway.stop()


def test_sessions_route_to_their_replica_from_any_gateway(gateways, oracle, decode_partial):
    a, b = (Api(g.base_url) for g in gateways)
    sessions = []
    for index in range(20):
        first, second = (a, b) if index % 2 == 0 else (b, a)
        prompt = f"Session {index}: Human: hello"
        session_id = first.open_session(64)
        part1 = first.generate(inputs=prompt, max_new_tokens=3, session_id=session_id)
        part2 = second.generate(max_new_tokens=3, session_id=session_id)
        assert part1["ok"] and part2["ok"], (part1, part2)
        assert part1["outputs"] + part2["outputs"] == decode_partial(oracle(prompt, 6))
        sessions.append(session_id)
    holders = {session_id.rpartition(".")[0] for session_id in sessions}
    assert holders == {"inference-1", "inference-2"}, "new sessions must spread over both replicas"
    for index, session_id in enumerate(sessions):
        assert (a if index % 2 else b).close_session(session_id) == {"ok": True}


def test_sessionless_requests_are_balanced(gateways, replicas):
    api = Api(gateways[0].base_url)
    before = {name: replica_request_count(service) for name, service in replicas.items()}
    for index in range(8):
        assert api.generate(inputs=f"Balanced {index}", max_new_tokens=1)["ok"]
    served = {name: replica_request_count(service) - before[name] for name, service in replicas.items()}
    assert all(count >= 2 for count in served.values()), served


def replica_request_count(service: ServiceProcess) -> float:
    """Generate requests a replica has answered, all statuses together."""
    text = requests.get(f"{service.base_url}/metrics", timeout=10).text
    prefix = 'petals_chat_requests_total{endpoint="/api/v1/generate"'
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


def test_stream_concatenates_to_the_v1_answer(gateways, oracle, decode):
    prompt = "A human talks to a powerful AI"
    status, events = Api(gateways[1].base_url).stream({"inputs": prompt, "max_new_tokens": 20})
    assert status == 200
    tokens = [data for event, data in events if event == "token"]
    done = [data for event, data in events if event == "done"]
    assert len(tokens) == 20 and len(done) == 1
    text = "".join(t["text"] for t in tokens)
    v1 = Api(gateways[0].base_url).generate(inputs=prompt, max_new_tokens=20)["outputs"]
    assert done[0]["outputs"] in (text, text + "\ufffd")  # done also releases an incomplete last character
    assert done[0]["outputs"] == v1 == decode(oracle(prompt, 20))
    assert done[0]["finish_reason"] == "length" and done[0]["seconds_per_token"] > 0


def test_stream_stops_at_a_stop_sequence(gateways, oracle, decode):
    prompt = "Human: Hi! Can you tell me what Petals is?\n\nAI:"
    full = decode(oracle(prompt, 30))
    stop = next(full[i : i + 2] for i in range(3, len(full) - 2) if "\ufffd" not in full[i : i + 2])
    status, events = Api(gateways[0].base_url).stream({"inputs": prompt, "max_new_tokens": 30, "stop": [stop]})
    done = events[-1][1]
    assert status == 200 and events[-1][0] == "done"
    assert done["finish_reason"] == "stop" and done["stop_sequence"] == stop
    assert done["outputs"] == full[: full.index(stop)]
    assert "".join(d["text"] for e, d in events if e == "token") == done["outputs"]


def test_stream_errors_use_real_status_codes(gateways):
    base = gateways[0].base_url
    assert Api(base).stream({"inputs": "Hi", "max_new_tokens": 0})[0] == 400
    assert Api(base).stream({"inputs": "Hi", "max_new_tokens": 1, "session_id": "inference-1.gone"})[0] == 404
    assert Api(base).stream({"inputs": "Hi", "max_new_tokens": 1, "session_id": "inference-7.x"})[0] == 404
    assert Api(base).stream({"inputs": "x" * 20_000, "max_new_tokens": 1})[0] == 413
    status, events = Api(base).stream({"max_new_tokens": 1})
    assert status == 400 and events[0][1]["error"]["code"] == "invalid_parameter"


def test_busy_session_gets_409_and_a_disconnect_frees_it(gateways):
    api = Api(gateways[0].base_url)
    session_id = api.open_session(512)
    long = requests.post(
        f"{gateways[0].base_url}/api/v2/generate_stream",
        json={"inputs": "Hello", "max_new_tokens": 400, "session_id": session_id},
        stream=True,
        timeout=60,
    )
    lines = long.iter_lines()
    assert next(lines).startswith(b"event: token")  # generating now
    status, events = Api(gateways[1].base_url).stream({"max_new_tokens": 1, "session_id": session_id})
    assert status == 409 and events[0][1]["error"]["code"] == "session_busy"
    long.close()  # the client goes away mid-stream
    deadline = time.monotonic() + 10
    while True:
        body = api.generate(max_new_tokens=1, session_id=session_id)
        if body["ok"]:
            break
        assert "busy" in body["traceback"] and time.monotonic() < deadline, body
        time.sleep(0.2)
    assert api.close_session(session_id) == {"ok": True}


def test_requests_are_routed_by_model(gateways, replicas, chatml_inference, model_dir, oracle, decode):
    """v1 (form and JSON) and v2 name a model; the replica of that model answers; none names the default."""
    api, base = Api(gateways[0].base_url), gateways[0].base_url
    prompt, expected = "Routed by model", decode(oracle("Routed by model", 4))
    every = {**replicas, "chatml": chatml_inference}
    before = {name: replica_request_count(service) for name, service in every.items()}
    assert api.generate(inputs=prompt, max_new_tokens=4, model=CHATML_MODEL) == {"ok": True, "outputs": expected}
    sent = {"inputs": prompt, "max_new_tokens": 4, "model": CHATML_MODEL}
    assert requests.post(f"{base}/api/v1/generate", json=sent, timeout=60).json()["outputs"] == expected
    assert api.generate(inputs=prompt, max_new_tokens=4, model=model_dir.name)["outputs"] == expected
    assert api.generate(inputs=prompt, max_new_tokens=4)["outputs"] == expected  # the default model
    status, events = Api(base).stream(sent)
    assert status == 200 and events[-1][1]["outputs"] == expected
    after = {name: replica_request_count(service) for name, service in every.items()}
    assert after["chatml"] - before["chatml"] == 2  # v1 twice (the stream is counted on its own endpoint)
    assert sum(after[name] - before[name] for name in replicas) == 2


def test_a_session_stays_on_its_model(gateways):
    api, base = Api(gateways[0].base_url), gateways[0].base_url
    opened = requests.get(f"{base}/api/v1/open_inference_session", params={"max_length": 32, "model": CHATML_MODEL})
    session_id = opened.json()["session_id"]
    assert session_id.startswith("inference-chatml.")
    assert api.generate(inputs="Hi", max_new_tokens=1, session_id=session_id)["ok"]  # no model: the session's
    assert api.generate(max_new_tokens=1, session_id=session_id, model=CHATML_MODEL)["ok"]
    other = api.generate(max_new_tokens=1, session_id=session_id, model=api_default_model(base))
    assert other["ok"] is False and f"belongs to the model '{CHATML_MODEL}'" in other["traceback"]
    status, events = Api(base).stream({"max_new_tokens": 1, "session_id": session_id, "model": "tiny-bloom-x"})
    assert status == 404 and events[0][1]["error"]["code"] == "model_not_found"
    assert api.close_session(session_id) == {"ok": True}


def api_default_model(base_url: str) -> str:
    models = requests.get(f"{base_url}/v1/models", timeout=10).json()["data"]
    return next(entry["id"] for entry in models if entry["default"])


def test_unknown_model_lists_the_served_ones(gateways, model_dir):
    api, base = Api(gateways[1].base_url), gateways[1].base_url
    served = f"served: {model_dir.name}, {CHATML_MODEL}"
    body = api.generate(inputs="Hi", max_new_tokens=1, model="gpt-4")  # v1: HTTP 200, ok: false
    assert body == {"ok": False, "traceback": f"The model 'gpt-4' is not served here; {served}"}
    opened = requests.get(f"{base}/api/v1/open_inference_session", params={"max_length": 8, "model": "gpt-4"}).json()
    assert opened["ok"] is False and served in opened["traceback"]
    status, events = Api(base).stream({"inputs": "Hi", "max_new_tokens": 1, "model": "gpt-4"})
    assert status == 404 and events[0][1]["error"] == {"code": "model_not_found", "message": body["traceback"]}


def test_models_lists_every_model_with_its_card(gateways, model_dir):
    models = requests.get(f"{gateways[0].base_url}/v1/models", timeout=10).json()["data"]
    assert [(entry["id"], entry["default"]) for entry in models] == [(model_dir.name, True), (CHATML_MODEL, False)]
    default, chatml = models
    assert (default["chat"]["name"], chatml["chat"]["name"]) == ("human-ai", "chatml")
    assert chatml["description"] == CHATML_DESCRIPTION and chatml["chat"]["stop"] == ["<|im_end|>"]
    assert chatml["max_length"] == 2048 and chatml["defaults"]["max_new_tokens"] > 0


def test_default_model_setting(replicas, chatml_inference, artifacts_dir):
    urls = {name: service.base_url for name, service in replicas.items()}
    gateway = start_gateway(artifacts_dir, {**urls, chatml_inference.name: chatml_inference.base_url},
                            "gateway-default-model", DEFAULT_MODEL=CHATML_MODEL)  # fmt: skip
    try:
        session_id = Api(gateway.base_url).open_session(16)
        assert session_id.startswith("inference-chatml.")
        assert Api(gateway.base_url).close_session(session_id) == {"ok": True}
        assert api_default_model(gateway.base_url) == CHATML_MODEL
    finally:
        gateway.stop()


def test_gateway_restart_loses_no_session(gateways, replicas, artifacts_dir, oracle, decode_partial):
    urls = {name: service.base_url for name, service in replicas.items()}
    first = start_gateway(artifacts_dir, urls, "gateway-restart-1")
    prompt = "Human: List the planets.\n\nAI:"
    session_id = Api(first.base_url).open_session(64)
    part1 = Api(first.base_url).generate(inputs=prompt, max_new_tokens=4, session_id=session_id)
    first.stop()
    second = start_gateway(artifacts_dir, urls, "gateway-restart-2")
    try:
        part2 = Api(second.base_url).generate(max_new_tokens=4, session_id=session_id)
        assert part1["outputs"] + part2["outputs"] == decode_partial(oracle(prompt, 8))
        assert Api(second.base_url).close_session(session_id) == {"ok": True}
    finally:
        second.stop()


def test_adding_a_replica_misroutes_no_session(gateways, replicas, inference, artifacts_dir, oracle, decode_partial):
    old = Api(gateways[0].base_url)
    prompts = {old.open_session(64): f"Existing {i}:" for i in range(6)}
    for session_id, prompt in prompts.items():
        assert old.generate(inputs=prompt, max_new_tokens=2, session_id=session_id)["ok"]
    urls = {name: service.base_url for name, service in replicas.items()}
    grown = start_gateway(artifacts_dir, {**urls, "inference-0": inference.base_url}, "gateway-three-replicas")
    try:
        new = Api(grown.base_url)
        for session_id, prompt in prompts.items():
            body = new.generate(max_new_tokens=2, session_id=session_id)
            assert body["ok"], body
            assert decode_partial(oracle(prompt, 4)).endswith(body["outputs"])
            assert new.close_session(session_id) == {"ok": True}
        holders = {new.open_session(16).rpartition(".")[0] for _ in range(6)}
        assert "inference-0" in holders, "the added replica takes new sessions"
    finally:
        grown.stop()


def test_killing_a_replica_expires_its_sessions_promptly(gateways, replicas):
    api = Api(gateways[0].base_url)
    by_replica: dict[str, list[str]] = {"inference-1": [], "inference-2": []}
    while min(len(v) for v in by_replica.values()) < 2:
        session_id = api.open_session(32)
        by_replica[session_id.rpartition(".")[0]].append(session_id)
        assert api.generate(inputs="Hi", max_new_tokens=1, session_id=session_id)["ok"]
    replicas["inference-2"].process.kill()  # SIGKILL the gunicorn master...
    replicas["inference-2"].stop(timeout=1)  # ...and the rest of its process group
    for session_id in by_replica["inference-2"]:
        started = time.monotonic()
        body = Api(gateways[1].base_url).generate(max_new_tokens=1, session_id=session_id)
        assert time.monotonic() - started < 2.0
        assert body["ok"] is False and f"Session {session_id} expired" in body["traceback"]
    for session_id in by_replica["inference-1"]:
        assert api.generate(max_new_tokens=1, session_id=session_id)["ok"]
        assert api.close_session(session_id) == {"ok": True}
    for _ in range(4):  # new sessions avoid the dead replica
        assert api.open_session(16).startswith("inference-1.")
