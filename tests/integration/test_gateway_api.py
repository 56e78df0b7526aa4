"""The gateway's public surface: OpenAPI conformance, metrics across workers, rate limit, CORS."""

from __future__ import annotations

import json

import jsonschema
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import InvalidStatus

from client.api import Api, connect_ws
from services.common.web.sse import parse_sse
from tests.helpers import start_gateway

# One valid example call per documented operation: (method, path, request kwargs).
EXAMPLES = {
    ("post", "/api/v1/generate"): {"data": {"inputs": "Hello", "max_new_tokens": "2", "model": "<model>"}},
    ("get", "/api/v1/open_inference_session"): {"params": {"max_length": "32", "model": "<model>"}},
    ("get", "/api/v1/close_inference_session"): {"params": {"session_id": "inference-0.unknown"}},
    ("post", "/api/v2/generate_stream"): {"json": {"inputs": "Hello", "max_new_tokens": 3}},
    ("get", "/api/v2/generate"): {},  # plain HTTP: 426 (the WebSocket conversation: test_the_websocket_messages_...)
    ("get", "/healthz"): {},
    ("get", "/readyz"): {},
    ("get", "/metrics"): {},
    ("get", "/api/openapi.json"): {},
    ("get", "/v1/models"): {},
    ("get", "/api/v2/swarm"): {"params": {"model": "<model>"}},
    ("post", "/v1/completions"): {
        "json": {"model": "<model>", "prompt": "Hello", "max_tokens": 2, "logprobs": 2, "echo": True, "best_of": 2}
    },
    ("post", "/v1/chat/completions"): {
        "json": {
            "model": "<model>",
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 2,
            "n": 2,
            "logprobs": True,
            "top_logprobs": 2,
            "presence_penalty": 0.5,
            "logit_bias": {"3": -1},
        }
    },
    ("post", "/v1/tokenize"): {"json": {"model": "<model>", "prompt": "Hello"}},
    ("post", "/v1/detokenize"): {"json": {"tokens": [3, 4]}},
}


@pytest.fixture(scope="module")
def document(gateway) -> dict:
    return requests.get(f"{gateway.base_url}/api/openapi.json", timeout=10).json()


def validate(document: dict, schema: dict, instance) -> None:
    jsonschema.validate(instance, {**schema, "components": document["components"]})


def test_every_documented_operation_exists_and_answers_per_its_schema(gateway, document, model_dir):
    operations = {(m, p) for p, item in document["paths"].items() for m in item}
    assert operations == set(EXAMPLES), "keep the examples in step with the document"
    for (method, path), example in EXAMPLES.items():
        kwargs = json.loads(json.dumps(example).replace("<model>", model_dir.name))
        response = requests.request(method, gateway.base_url + path, timeout=60, **kwargs)
        spec = document["paths"][path][method]["responses"].get(str(response.status_code))
        assert spec, f"{method.upper()} {path} answered an undocumented {response.status_code}"
        media_type = response.headers["Content-Type"].split(";")[0]
        content = spec["content"][media_type]
        if media_type == "application/json":
            validate(document, content["schema"], response.json())
        elif media_type == "text/event-stream":
            events = list(parse_sse([response.content]))
            assert [e for e, _ in events][-1] == "done"
            for event, data in events:
                validate(document, content["x-events"][event], data)
        else:
            assert response.text


def test_the_websocket_messages_match_the_document(gateway, document):
    """OpenAPI cannot describe a WebSocket conversation; the document names its messages in x-websocket."""
    described = document["paths"]["/api/v2/generate"]["get"]["x-websocket"]
    sent = [
        {"type": "open_inference_session", "max_length": 32},
        {"type": "generate", "inputs": "Hello", "max_new_tokens": 1, "stop_sequence": "\x00", "top_k": 5},
        {"type": "generate", "max_new_tokens": 0},
    ]
    with connect_ws(gateway.port) as ws:
        received = []
        for message in sent:
            if message["max_new_tokens" if "max_new_tokens" in message else "type"]:  # the last one is invalid
                validate(document, described["client-messages"], message)
            ws.send(json.dumps(message))
            while True:
                received.append(json.loads(ws.recv(timeout=60)))
                if not received[-1]["ok"] or received[-1].get("stop", True):
                    break
    assert received[0] == {"ok": True} and received[-1]["ok"] is False and len(received) >= 4
    for message in received:
        validate(document, described["server-messages"], message)


def test_documented_errors_match_the_schema(gateway, document):
    errors = document["paths"]["/api/v2/generate_stream"]["post"]["responses"]
    for body, status in [
        ({"inputs": "Hi"}, 400),
        ({"inputs": "Hi", "max_new_tokens": 1, "session_id": "x.y"}, 404),
        ({"inputs": "Hi", "max_new_tokens": 1, "model": "no-such-model"}, 404),
    ]:
        response = requests.post(f"{gateway.base_url}/api/v2/generate_stream", json=body, timeout=30)
        assert response.status_code == status
        validate(document, errors[str(status)]["content"]["application/json"]["schema"], response.json())


def test_openai_errors_match_the_schema(gateway, document, model_dir):
    errors = document["paths"]["/v1/chat/completions"]["post"]["responses"]
    for body, status in [
        ({"model": model_dir.name, "messages": "Hi"}, 400),
        ({"model": "no-such-model", "messages": [{"role": "user", "content": "Hi"}]}, 404),
    ]:
        response = requests.post(f"{gateway.base_url}/v1/chat/completions", json=body, timeout=30)
        assert response.status_code == status
        validate(document, errors[str(status)]["content"]["application/json"]["schema"], response.json())
        assert response.json()["error"]["param"] in ("messages", "model")


def test_request_metrics_add_up_across_workers(gateway):
    def count() -> float:
        families = text_string_to_metric_families(requests.get(f"{gateway.base_url}/metrics", timeout=10).text)
        return sum(
            s.value
            for f in families
            for s in f.samples
            if s.name == "petals_chat_requests_total" and s.labels["endpoint"] == "/api/v1/open_inference_session"
        )

    before = count()
    for _ in range(12):  # a new connection each time: the requests land on both workers
        requests.get(f"{gateway.base_url}/api/v1/open_inference_session", params={"max_length": "x"}, timeout=10)
    assert count() - before == 12


def test_routing_metrics_are_exported(gateway):
    Api(gateway.base_url).generate(inputs="Hi", max_new_tokens=1)
    text = requests.get(f"{gateway.base_url}/metrics", timeout=10).text
    assert 'petals_chat_gateway_routing_decisions_total{decision="sessionless",replica="inference-0"}' in text
    assert "petals_chat_gateway_upstream_duration_seconds_bucket" in text


def test_rate_limit(inference, artifacts_dir):
    limited = start_gateway(
        artifacts_dir,
        {"inference-0": inference.base_url},
        "gateway-rate-limited",
        RATE_LIMIT_PER_MINUTE="6",
        RATE_LIMIT_BURST="3",
        GUNICORN_WORKERS="1",
    )
    try:
        url = f"{limited.base_url}/api/v1/open_inference_session"
        answers = [requests.get(url, params={"max_length": "x"}, timeout=10) for _ in range(4)]
        assert [a.json()["ok"] for a in answers] == [False] * 4
        assert all("max_length must be" in a.json()["traceback"] for a in answers[:3])
        assert "Too many requests" in answers[3].json()["traceback"] and answers[3].headers["Retry-After"]
        streamed = requests.post(f"{limited.base_url}/api/v2/generate_stream", json={}, timeout=10)
        assert streamed.status_code == 429
        with pytest.raises(InvalidStatus) as refused:  # opening a WebSocket counts too
            connect_ws(limited.port)
        assert refused.value.response.status_code == 403
        assert requests.get(f"{limited.base_url}/healthz", timeout=10).status_code == 200  # not limited
    finally:
        limited.stop()


def test_cors_preflight_and_headers(gateway):
    preflight = requests.options(
        f"{gateway.base_url}/api/v2/generate_stream",
        headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
        timeout=10,
    )
    assert preflight.status_code == 200
    assert preflight.headers["Access-Control-Allow-Origin"] == "*"
    simple = requests.get(f"{gateway.base_url}/healthz", headers={"Origin": "https://app.example"}, timeout=10)
    assert simple.headers["Access-Control-Allow-Origin"] == "*"
