"""API keys and per-client session quotas through the gateway, against the real swarm.

One inference replica with a quota of 2 sessions per client, behind three gateways: one with keys
(alice, bob), one without (clients told apart by address) and one with keys and tight per-key rate
limits that lets anonymous clients in at a rate of their own. Clients: the official ``openai``
package, plain HTTP for v1 and v2, the ``websockets`` library for the WebSocket API.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
from collections.abc import Iterator

import openai
import pytest
import requests
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection

from client.api import Api, ask, connect_ws
from client.probes import wait_until
from deploy.local_stack import ServiceProcess
from tests.helpers import Stack, dedicated_stack, metric_value, start_gateway

ALICE, BOB = "alice-secret-key-7f3c9a21d4", "bob-secret-key-5e8b02c6f1a9"
KEYS = f"alice:{ALICE} bob:{BOB}"
QUOTA = 2


@pytest.fixture(scope="module")
def stack(swarm, model_dir, artifacts_dir) -> Iterator[Stack]:
    with dedicated_stack(swarm, model_dir, artifacts_dir, "keys", inference_env={"MAX_SESSIONS_PER_CLIENT": str(QUOTA)},
                         gateway_env={"API_KEYS": KEYS, "ACCESS_LOG": "1"}) as running:  # fmt: skip
        yield running


@pytest.fixture(scope="module")
def gateway(stack) -> str:
    return stack.gateway.base_url


@pytest.fixture(scope="module")
def open_gateway(stack, artifacts_dir) -> Iterator[ServiceProcess]:
    """The same replica behind a gateway without keys."""
    service = start_gateway(artifacts_dir, {stack.replicas[0].name: stack.replicas[0].base_url}, "keys-off-gateway")
    yield service
    service.stop()


@pytest.fixture(scope="module")
def limited_gateway(stack, artifacts_dir) -> Iterator[ServiceProcess]:
    """Keys, 2 requests of burst per key id, and anonymous clients let in at 1 a minute (burst 2)."""
    rates = {"RATE_LIMIT_PER_MINUTE": "1", "RATE_LIMIT_BURST": "2", "ANONYMOUS_RATE_LIMIT_PER_MINUTE": "1"}
    env = {"API_KEYS": KEYS, **rates, "GUNICORN_WORKERS": "1"}
    service = start_gateway(artifacts_dir, {stack.replicas[0].name: stack.replicas[0].base_url}, "keys-limited", **env)
    yield service
    service.stop()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def open_session(base_url: str, headers: dict[str, str] | None = None, max_length: int = 64) -> requests.Response:
    return requests.get(f"{base_url}/api/v1/open_inference_session", params={"max_length": max_length},
                        headers=headers, timeout=30)  # fmt: skip


def session_of(base_url: str, key: str | None, max_length: int = 64) -> str:
    return Api(base_url, headers=bearer(key) if key else None).open_session(max_length)


def generate(base_url: str, session_id: str, key: str | None) -> dict:
    return Api(base_url, headers=bearer(key) if key else None).generate(session_id=session_id, inputs="Hi",
                                                                        max_new_tokens=1)  # fmt: skip


def ws_connect(base_url: str, query: str = "", **kwargs) -> ClientConnection:
    return connect_ws(urllib.parse.urlsplit(base_url).port, query, **kwargs)


def openai_client(base_url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0, timeout=60)


# ---- keys ------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", [None, "wrong-key-0123456789abcdef"])
def test_openai_client_without_a_valid_key_raises_authentication_error(gateway, model_dir, key):
    client = openai_client(gateway, key or "placeholder")
    headers = {"Authorization": openai.Omit()} if key is None else None  # None: send no key at all
    with pytest.raises(openai.AuthenticationError) as caught:
        client.completions.create(model=model_dir.name, prompt="Hi", max_tokens=2, temperature=0, extra_headers=headers)
    assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client.models.list(extra_headers=headers)


def test_openai_client_with_its_key_is_served(gateway, model_dir):
    client = openai_client(gateway, ALICE)
    assert [model.id for model in client.models.list().data] == [model_dir.name]
    answer = client.chat.completions.create(model=model_dir.name, messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=3, temperature=0)  # fmt: skip
    assert answer.usage.completion_tokens >= 1


def test_v1_keeps_its_envelope_for_a_missing_or_wrong_key(gateway):
    for headers in (None, bearer("wrong-key-0123456789abcdef"), {"X-API-Key": ALICE[:-1]}):
        response = open_session(gateway, headers)
        assert response.status_code == 200, response.text
        assert response.json()["ok"] is False and "key" in response.json()["traceback"]
        assert response.headers["X-Petals-Chat-Status"] == "401"
    query_only = requests.get(f"{gateway}/api/v1/open_inference_session", params={"max_length": 8, "api_key": ALICE})
    assert query_only.json()["ok"] is False  # a key in a URL is only taken on the WebSocket handshake


def test_v1_and_v2_with_a_key(gateway):
    session_id = session_of(gateway, ALICE)
    assert generate(gateway, session_id, ALICE)["ok"]
    response = requests.post(f"{gateway}/api/v2/generate_stream", json={"inputs": "Hi", "max_new_tokens": 2},
                             headers={"X-API-Key": BOB}, timeout=60)  # fmt: skip
    assert response.status_code == 200 and "event: done" in response.text
    refused = requests.post(f"{gateway}/api/v2/generate_stream", json={"inputs": "Hi", "max_new_tokens": 2}, timeout=60)
    assert refused.status_code == 401 and refused.headers["WWW-Authenticate"] == "Bearer"
    assert refused.json() == {
        "ok": False,
        "error": {"code": "invalid_api_key", "message": refused.json()["error"]["message"]},
    }


@pytest.mark.parametrize("query", ["", "?api_key=wrong-key-0123456789abcdef"])
def test_websocket_without_a_valid_key_gets_an_error_message_and_close_1008(gateway, query):
    with ws_connect(gateway, query) as ws:
        message = json.loads(ws.recv(timeout=10))
        assert message["ok"] is False and "key" in message["traceback"]
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
    assert closed.value.rcvd.code == 1008


@pytest.mark.parametrize("how", ["header", "query"])
def test_websocket_with_a_key_in_a_header_or_the_query(gateway, how):
    kwargs = {"additional_headers": bearer(ALICE)} if how == "header" else {}
    with ws_connect(gateway, "" if how == "header" else f"?api_key={ALICE}", **kwargs) as ws:
        assert ask(ws, {"type": "open_inference_session", "max_length": 32}) == {"ok": True}
        answer = ask(ws, {"type": "generate", "inputs": "Hi", "max_new_tokens": 2})
        assert answer["ok"] and answer["stop"] and answer["token_count"] == 2


def test_health_readiness_and_metrics_need_no_key(gateway):
    for path in ("/healthz", "/readyz", "/metrics", "/api/openapi.json"):
        assert requests.get(gateway + path, timeout=10).status_code == 200, path


def test_the_openapi_document_says_keys_are_needed(gateway):
    document = requests.get(f"{gateway}/api/openapi.json", timeout=10).json()
    assert document["security"] == [{"bearer": []}, {"apiKeyHeader": []}]
    assert document["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer", "description": "Authorization: Bearer <API key>"
    }  # fmt: skip
    assert document["paths"]["/api/openapi.json"]["get"]["security"] == []


def test_requests_are_counted_per_key_id_and_keys_never_logged(stack, gateway):
    def count(key_id: str) -> float:
        text = requests.get(f"{gateway}/metrics", timeout=10).text
        return metric_value(text, f'petals_chat_gateway_client_requests_total{{key_id="{key_id}",status="200"}}')

    before = count("bob")
    requests.get(f"{gateway}/v1/models", headers=bearer(BOB), timeout=10)
    open_session(gateway, {"X-API-Key": "not-a-key-0123456789"})
    assert count("bob") == before + 1
    gateway_metrics = requests.get(f"{gateway}/metrics", timeout=10).text
    assert 'key_id="refused",status="401"' in gateway_metrics
    replica_metrics = requests.get(f"{stack.replicas[0].base_url}/metrics", timeout=10).text
    logs = stack.gateway.log_path.read_text() + stack.replicas[0].log_path.read_text()
    assert "/api/v2/generate?api_key=[redacted]" in logs  # the handshake with the key in its query was logged
    for secret in (ALICE, BOB, "not-a-key-0123456789", "wrong-key-0123456789abcdef"):
        assert secret not in logs and secret not in gateway_metrics and secret not in replica_metrics


def test_rate_limits_per_key_id_and_anonymous_clients_at_their_own_rate(limited_gateway):
    base = limited_gateway.base_url

    def status(headers: dict[str, str] | None) -> int:
        return requests.get(f"{base}/v1/models", headers=headers, timeout=10).status_code

    assert [status(bearer(BOB)) for _ in range(3)] == [200, 200, 429]
    assert status(bearer(ALICE)) == 200  # alice's bucket is her own
    assert [status(None) for _ in range(3)] == [200, 200, 429]  # no key: let in, at the anonymous rate
    assert status(bearer("wrong-key-0123456789abcdef")) == 401  # a wrong key is never anonymous


# ---- session quotas --------------------------------------------------------------------------


def test_quota_closes_the_clients_oldest_idle_session(gateway):
    first, second = session_of(gateway, ALICE), session_of(gateway, ALICE)
    assert generate(gateway, first, ALICE)["ok"]  # now second is the least recently used
    theirs = session_of(gateway, BOB)
    third = session_of(gateway, ALICE)
    expired = generate(gateway, second, ALICE)
    assert expired["ok"] is False and f"Session {second} expired" in expired["traceback"]
    for session_id, key in ((first, ALICE), (third, ALICE), (theirs, BOB)):
        assert generate(gateway, session_id, key)["ok"]


def test_quota_full_of_busy_sessions_is_429(gateway):
    sessions = [session_of(gateway, BOB, max_length=512) for _ in range(QUOTA)]
    streams, started = [], threading.Barrier(QUOTA + 1)

    def hold(session_id: str) -> None:
        body = {"session_id": session_id, "inputs": "Hi", "max_new_tokens": 400}
        response = requests.post(f"{gateway}/api/v2/generate_stream", json=body, headers=bearer(BOB), stream=True,
                                 timeout=120)  # fmt: skip
        streams.append(response)
        next(response.iter_lines())  # the first event: generating
        started.wait()

    threads = [threading.Thread(target=hold, args=(session_id,)) for session_id in sessions]
    for thread in threads:
        thread.start()
    started.wait(timeout=60)
    try:
        refused = open_session(gateway, bearer(BOB))
        assert refused.json()["ok"] is False and "quota of 2 sessions, all busy" in refused.json()["traceback"]
        assert refused.headers["X-Petals-Chat-Status"] == "429"
        with ws_connect(gateway, additional_headers=bearer(BOB)) as ws:
            answer = ask(ws, {"type": "open_inference_session", "max_length": 32})
            assert answer["ok"] is False and "all busy" in answer["traceback"]
    finally:
        for response in streams:
            response.close()  # the replica stops generating
        for thread in threads:
            thread.join(10)


def test_websocket_sessions_count_toward_the_quota(gateway):
    headers = bearer(ALICE)
    with (
        ws_connect(gateway, additional_headers=headers) as oldest,
        ws_connect(gateway, additional_headers=headers) as newer,
    ):
        for ws in (oldest, newer):
            assert ask(ws, {"type": "open_inference_session", "max_length": 32}) == {"ok": True}
        with ws_connect(gateway, additional_headers=headers) as third:
            assert ask(third, {"type": "open_inference_session", "max_length": 32}) == {"ok": True}
            lost = ask(oldest, {"type": "generate", "inputs": "Hi", "max_new_tokens": 1})
            assert lost["ok"] is False and "expired" in lost["traceback"]
            with pytest.raises(ConnectionClosed) as closed:
                oldest.recv(timeout=10)
            assert closed.value.rcvd.code == 1011
            for ws in (newer, third):
                assert ask(ws, {"type": "generate", "inputs": "Hi", "max_new_tokens": 1})["ok"]


def test_without_keys_the_quota_is_per_client_address(stack, open_gateway):
    base = open_gateway.base_url
    sessions = [session_of(base, None) for _ in range(QUOTA + 1)]
    expired = generate(base, sessions[0], None)
    assert expired["ok"] is False and "expired" in expired["traceback"]
    assert all(generate(base, session_id, None)["ok"] for session_id in sessions[1:])
    closed = 'petals_chat_sessions_closed_total{reason="quota"}'
    replica = stack.replicas[0].base_url
    assert wait_until(lambda: metric_value(requests.get(f"{replica}/metrics", timeout=10).text, closed) >= 3, 10)


def test_a_rotated_key_file_takes_effect_without_a_restart(stack, artifacts_dir):
    """A gateway (2 workers) reading API_KEYS_FILE, which is replaced as Kubernetes updates a mounted Secret."""
    keys_dir = artifacts_dir / "rotated-keys"
    keys_dir.mkdir(exist_ok=True)
    path = keys_dir / "keys"
    path.write_text(f"alice:{ALICE}\n")
    env = {"API_KEYS_FILE": str(path), "API_KEYS_RELOAD_SECONDS": "0.5"}
    service = start_gateway(artifacts_dir, {stack.replicas[0].name: stack.replicas[0].base_url}, "keys-rotated", **env)

    def served(key: str) -> bool:  # an API route that needs a key and holds no session
        status = requests.get(f"{service.base_url}/v1/models", headers=bearer(key), timeout=10).status_code
        assert status in (200, 401), status
        return status == 200

    try:
        assert served(ALICE) and not served(BOB)
        new = keys_dir / "keys.new"
        new.write_text(f"# alice's key revoked, bob's added\nbob:{BOB}\n")
        new.replace(path)
        # Each worker looks at the file on its own, at most every 0.5 s, when a request needs the keys:
        # once that much has passed, every request (whichever worker takes it) must agree. (Asking
        # sooner raced: a worker that had looked just before the replace kept the old keys a moment.)
        time.sleep(1.0)
        assert not any(served(ALICE) for _ in range(8)), "alice's key still works"
        assert all(served(BOB) for _ in range(8))
        new.write_text("bob:short\n")  # a bad version: refused, bob's key stays in force
        new.replace(path)
        refused = lambda: "API keys not reloaded" in service.log_path.read_text()  # noqa: E731
        # The file is looked at when a request needs the keys: bob's requests go on being served.
        assert wait_until(lambda: served(BOB) and refused(), timeout=15), service.log_tail()
        assert served(BOB) and not served(ALICE)
        assert BOB not in service.log_path.read_text() and ALICE not in service.log_path.read_text()
    finally:
        service.stop()
