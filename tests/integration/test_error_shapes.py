"""Every answer in our shapes: requests the HTTP servers refuse by themselves, over raw sockets.

A malformed request line, header or chunked body, a head over the limits, a refused WebSocket
handshake: gunicorn (inference) and uvicorn/httptools (gateway) answer them before any app
sees them. Each answer must be JSON in the error shape of the routes its path names, in both
services (v1: HTTP 200 and the status in a header; OpenAI's under /v1/; the default one elsewhere,
and when the request line itself is broken), with no HTML and no stack frame, and the service
keeps serving. The ui is reached only through the gateway: it runs gunicorn's stock worker, whose
refusals are gunicorn's own.
"""

from __future__ import annotations

import pytest
import requests

from deploy.local_stack import ServiceProcess
from tests.helpers import RawResponse, http_head, raw_exchange

pytestmark = pytest.mark.integration
LONG = "a" * 9000  # over every service's request-line and header-field limits


@pytest.fixture(params=["gateway", "inference"])
def service(request) -> ServiceProcess:
    return request.getfixturevalue(request.param)


def assert_shape(response: RawResponse, path: str | None, status: int) -> None:
    """JSON in the error shape of ``path``'s routes, with ``status`` (v1: in its header)."""
    assert response.headers["content-type"] == "application/json", response
    body = response.json()
    assert response.headers["x-petals-chat-status"] == str(status), response
    text = response.body.decode()
    assert "<html" not in text and "Traceback" not in text and 'File "' not in text, text
    if path and path.startswith("/api/v1/"):
        assert response.status == 200 and body["ok"] is False and body["traceback"], body
    elif path and path.startswith("/v1/"):
        assert response.status == status and body["error"]["message"] and body["error"]["type"], body
    else:
        assert response.status == status and body["ok"] is False and body["error"]["message"], body
        assert body["error"]["code"] == response.headers["x-petals-chat-error"]


def exchange(service: ServiceProcess, data: bytes) -> RawResponse:
    response = raw_exchange(service.port, data)
    assert requests.get(f"{service.base_url}/healthz", timeout=10).status_code == 200  # still serving
    return response


def chunked(path: str, body: bytes) -> bytes:
    return http_head("POST", path, [("Content-Type", "application/json"), ("Transfer-Encoding", "chunked")]) + body


# (name, path of the route or None, request bytes, status). Each is sent to every service.
CASES = [
    ("garbage", None, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not http\r\n\r\n", 400),
    ("no version", None, b"GET /\r\n\r\n", 400),
    ("bad version", "/healthz", b"GET /healthz HTTP/9.x\r\nHost: x\r\n\r\n", 400),
    ("bad method", None, b"G(T /healthz HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("header without colon", "/api/v1/generate", http_head("GET", "/api/v1/generate", [("Bad Header", "x")]), 400),
    ("bad header name", "/v1/models", http_head("GET", "/v1/models", [("Bad@Name", "x")]), 400),
    ("control char in a header", "/readyz", http_head("GET", "/readyz", [("X-A", "a\x01b")]), 400),
    ("header field too large", "/api/v1/generate", http_head("GET", "/api/v1/generate", [("X-Long", LONG)]), 431),
    ("too many headers", "/v1/models", http_head("GET", "/v1/models", [(f"X-{i}", "1") for i in range(120)]), 431),
    ("bad chunk size", "/api/v1/generate", chunked("/api/v1/generate", b"zz\r\n{}\r\n0\r\n\r\n"), 400),
    (
        "chunk without terminator",
        "/api/v2/generate_stream",
        chunked("/api/v2/generate_stream", b"2\r\n{}XX0\r\n\r\n"),
        400,
    ),
]


@pytest.mark.parametrize(("name", "path", "data", "status"), CASES, ids=[case[0] for case in CASES])
def test_malformed_requests_are_answered_in_the_route_shape(service, name, path, data, status):
    assert_shape(exchange(service, data), path, status)


@pytest.mark.parametrize("path", ["/api/v1/generate", "/v1/models", "/readyz"])
def test_a_too_long_url_is_answered_414(service, path):
    response = exchange(service, http_head("GET", f"{path}?inputs={LONG}"))
    # The gateway reads the path from the URL's first bytes; gunicorn refuses the line before
    # parsing it: its worker peeked at the line's start.
    assert_shape(response, path, 414)


WS_HEADERS = [("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Version", "13")]


def test_a_bad_websocket_handshake_is_refused_in_json(gateway):
    response = exchange(gateway, http_head("GET", "/api/v2/generate", WS_HEADERS, close=False))  # no key
    assert_shape(response, None, 400)
    assert "Sec-WebSocket-Key" in response.json()["error"]["message"]


def test_a_websocket_to_an_http_route_is_refused_in_json(gateway):
    key = ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
    response = exchange(gateway, http_head("GET", "/api/v1/generate", [*WS_HEADERS, key], close=False))
    assert_shape(response, None, 403)
