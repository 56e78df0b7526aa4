"""Abuse of the gateway's HTTP surface, over raw sockets: oversized and chunked bodies, slow and
idle clients, invalid UTF-8, header abuse. Never a 5xx, always a clear answer, and the gateway
keeps serving normal requests (checked after every case).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import requests

from deploy.local_stack import ServiceProcess
from services.gateway.http_protocol import HEAD_TIMEOUT_S
from tests.helpers import RawResponse, http_head, raw_exchange, read_response, start_gateway

LIMIT = 4096  # the gateway's MAX_BODY_BYTES here
JSON = ("Content-Type", "application/json")
FORM = ("Content-Type", "application/x-www-form-urlencoded")


@pytest.fixture(scope="module")
def target(inference: ServiceProcess, artifacts_dir) -> Iterator[ServiceProcess]:
    gateway = start_gateway(
        artifacts_dir, {"inference-0": inference.base_url}, "gateway-abuse", MAX_BODY_BYTES=str(LIMIT)
    )
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def normal_answer(target: ServiceProcess) -> Callable[[], str]:
    """A normal generation through the gateway; every later call must give the same text."""

    def generate() -> str:
        response = requests.post(
            f"{target.base_url}/api/v1/generate", json={"inputs": "Hi", "max_new_tokens": 2}, timeout=30
        )
        body = response.json()
        assert response.status_code == 200 and body["ok"], body
        return body["outputs"]

    expected = generate()

    def check() -> str:
        assert generate() == expected  # greedy: the gateway still serves, and correctly
        return expected

    return check


def error_message(response: RawResponse) -> str:
    """The message of any of the API's error envelopes (v1, v2, OpenAI)."""
    body = response.json()
    if "traceback" in body:
        return body["traceback"]
    return body["error"]["message"]


def assert_too_large(response: RawResponse, path: str) -> None:
    """413 with a JSON message naming the limit (v1 keeps HTTP 200 and says 413 in a header)."""
    expected = 200 if path.startswith("/api/v1/") else 413
    assert response.status == expected, response
    assert response.headers["content-type"].startswith("application/json")
    assert f"limit of {LIMIT} bytes" in error_message(response) or f"the limit is {LIMIT}" in error_message(response)
    if path.startswith("/api/v1/"):
        assert response.json()["ok"] is False and response.headers["x-petals-chat-status"] == "413"


BODY_PATHS = ["/api/v1/generate", "/api/v2/generate_stream", "/v1/completions"]


@pytest.mark.parametrize("path", BODY_PATHS)
def test_declared_length_over_the_limit_is_refused_before_the_body(target, normal_answer, path):
    head = http_head("POST", path, [JSON, ("Content-Length", str(100 * LIMIT))])
    started = time.monotonic()
    response = raw_exchange(target.port, head + b"{", timeout=10)  # the body never comes
    assert time.monotonic() - started < 3
    assert_too_large(response, path)
    normal_answer()


def test_huge_declared_length(target, normal_answer):
    response = raw_exchange(
        target.port, http_head("POST", "/api/v2/generate_stream", [JSON, ("Content-Length", "9" * 15)])
    )
    assert_too_large(response, "/api/v2/generate_stream")
    normal_answer()


def test_the_connection_survives_a_refused_body(target, normal_answer):
    """A body a little over the limit is read and dropped: the keep-alive connection goes on."""
    body = b'{"inputs": "' + b"a" * LIMIT + b'"}'
    with socket.create_connection(("127.0.0.1", target.port), timeout=30) as sock:
        head = http_head("POST", "/api/v2/generate_stream", [JSON, ("Content-Length", str(len(body)))], close=False)
        sock.sendall(head + body)
        assert_too_large(read_response(sock), "/api/v2/generate_stream")
        sock.sendall(http_head("GET", "/healthz"))
        assert read_response(sock).status == 200
    normal_answer()


def chunked(body: bytes, size: int = 1000) -> bytes:
    parts = [body[i : i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts) + b"0\r\n\r\n"


@pytest.mark.parametrize("path", BODY_PATHS)
def test_chunked_body_over_the_limit(target, normal_answer, path):
    body = b'{"inputs": "' + b"a" * (3 * LIMIT) + b'"}'
    response = raw_exchange(
        target.port, http_head("POST", path, [JSON, ("Transfer-Encoding", "chunked")]) + chunked(body)
    )
    assert_too_large(response, path)
    normal_answer()


def test_chunked_body_within_the_limit_is_read(target, normal_answer):
    """Regression: a chunked body used to be read as empty."""
    body = b'{"inputs": "Hi", "max_new_tokens": 2}'
    head = http_head("POST", "/api/v1/generate", [JSON, ("Transfer-Encoding", "chunked")])
    response = raw_exchange(target.port, head + chunked(body, size=7))
    assert response.status == 200 and response.json() == {"ok": True, "outputs": normal_answer()}


def assert_quick_answers(target: ServiceProcess, normal_answer: Callable[[], str], count: int = 5) -> None:
    """Other clients get their answers at once."""
    for _ in range(count):
        started = time.monotonic()
        normal_answer()
        assert time.monotonic() - started < 3


def test_idle_connections_do_not_hold_up_others(target, normal_answer):
    """Hundreds of connections that send nothing (the gateway's event loop holds them for the price of
    a socket each; they once tied up every request thread)."""
    idle = [socket.create_connection(("127.0.0.1", target.port)) for _ in range(300)]
    try:
        time.sleep(0.5)
        assert_quick_answers(target, normal_answer)
    finally:
        for sock in idle:
            sock.close()


def test_idle_connections_do_not_delay_a_graceful_stop(inference, artifacts_dir):
    gateway = start_gateway(artifacts_dir, {"inference-0": inference.base_url}, "gateway-abuse-stop")
    idle = socket.create_connection(("127.0.0.1", gateway.port))
    try:
        started = time.monotonic()
        assert gateway.stop(timeout=60) == 0
        assert time.monotonic() - started < 10  # not the 60 s graceful timeout
    finally:
        idle.close()
        gateway.stop()


def test_stalled_request_heads_are_dropped(target, normal_answer):
    """Clients that send half a request and stop are dropped after HEAD_TIMEOUT_S."""
    stalled = [socket.create_connection(("127.0.0.1", target.port), timeout=HEAD_TIMEOUT_S + 5) for _ in range(20)]
    try:
        for sock in stalled:
            sock.sendall(b"POST /api/v1/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-")
        assert_quick_answers(target, normal_answer)
        started = time.monotonic()
        for sock in stalled:
            assert sock.recv(1024) == b""  # the server closed it
        assert time.monotonic() - started < HEAD_TIMEOUT_S + 3
    finally:
        for sock in stalled:
            sock.close()


def test_trickled_bodies_do_not_hold_up_others(target, normal_answer):
    """Clients sending their body one byte per second; others are served meanwhile, and the
    slow ones get their answers in the end."""
    body = b'{"a":1}'
    answers: list[RawResponse] = []

    def trickle() -> None:
        with socket.create_connection(("127.0.0.1", target.port), timeout=60) as sock:
            sock.sendall(http_head("POST", "/api/v2/generate_stream", [JSON, ("Content-Length", str(len(body)))]))
            for byte in body:
                sock.sendall(bytes([byte]))
                time.sleep(1)
            answers.append(read_response(sock))

    threads = [threading.Thread(target=trickle) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(1)
    assert_quick_answers(target, normal_answer)
    for thread in threads:
        thread.join(30)
    assert len(answers) == 4
    for answer in answers:
        assert answer.status == 400 and "Set exactly one of max_length or max_new_tokens" in error_message(answer)


BAD_TEXT = [
    (
        "json body",
        "/api/v2/generate_stream",
        [JSON],
        b'{"inputs": "\xff\xfe", "max_new_tokens": 1}',
        400,
        "not valid UTF-8",
    ),
    ("json v1", "/api/v1/generate", [JSON], b'{"inputs": "\xc3", "max_new_tokens": 1}', 200, "not valid UTF-8"),
    ("json openai", "/v1/completions", [JSON], b'{"model": "m", "prompt": "\xed\xa0\x80"}', 400, "not valid UTF-8"),
    (
        "lone surrogate",
        "/api/v2/generate_stream",
        [JSON],
        b'{"inputs": "\\ud800", "max_new_tokens": 1}',
        400,
        "surrogate",
    ),
    ("form body", "/api/v1/generate", [FORM], b"inputs=\xff&max_new_tokens=1", 200, "not valid UTF-8"),
    (
        "form escaped",
        "/api/v1/generate",
        [FORM],
        b"inputs=%C3%28&max_new_tokens=1",
        200,
        "Form body is not valid UTF-8",
    ),
    ("query escaped", "/api/v2/generate_stream?inputs=%FF&max_new_tokens=1", [], b"", 400, "Query string is not valid"),
    ("query name", "/api/v1/open_inference_session?max_length=8&%FE=1", [], b"", 200, "Query string is not valid"),
]


@pytest.mark.parametrize(
    ("name", "path", "headers", "body", "status", "fragment"), BAD_TEXT, ids=[c[0] for c in BAD_TEXT]
)
def test_invalid_utf8_gets_a_clear_error(target, normal_answer, name, path, headers, body, status, fragment):
    method = "POST" if body or "generate" in path else "GET"
    head = http_head(method, path, [*headers, ("Content-Length", str(len(body)))])
    response = raw_exchange(target.port, head + body)
    assert response.status == status and fragment in error_message(response), response
    normal_answer()


def test_raw_non_ascii_in_the_request_line(target, normal_answer):
    response = raw_exchange(
        target.port, b"GET /api/v1/open_inference_session?max_length=\xff HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    assert response.status == 400 and b"Invalid" in response.body  # the HTTP server's own answer
    normal_answer()


GOOD_BODY = b'{"inputs": "Hi", "max_new_tokens": 2}'
HEADER_ABUSE = [
    ("huge header", [("X-Big", "a" * 20_000)], b"", 431),
    ("many headers", [(f"X-Header-{i}", "v") for i in range(500)], b"", 431),
    ("non-ascii value", [("X-Name", "caf\xe9 \xff"), JSON, ("Content-Length", str(len(GOOD_BODY)))], GOOD_BODY, 200),
    ("bogus content-length", [JSON, ("Content-Length", "abc")], b"{}", 400),
    ("negative content-length", [JSON, ("Content-Length", "-1")], b"{}", 400),
    ("two content-lengths", [JSON, ("Content-Length", "2"), ("Content-Length", "3")], b"{}", 400),
    ("length and chunked", [JSON, ("Content-Length", "2"), ("Transfer-Encoding", "chunked")], b"0\r\n\r\n", 400),
    ("two content-types", [JSON, ("Content-Type", "text/plain"), ("Content-Length", "2")], b"{}", 400),
    ("odd content-type", [("Content-Type", "application/json\xff; charset=\x01"), ("Content-Length", "2")], b"{}", 400),
    ("long request line", [("X-Pad", "")], b"", 414),
]


@pytest.mark.parametrize(("name", "headers", "body", "status"), HEADER_ABUSE, ids=[c[0] for c in HEADER_ABUSE])
def test_header_abuse_never_breaks_the_gateway(target, normal_answer, name, headers, body, status):
    path = "/api/v2/generate_stream" + ("?x=" + "a" * 10_000 if name == "long request line" else "")
    response = raw_exchange(target.port, http_head("POST" if body else "GET", path, headers) + body)
    assert response.status == status, response
    normal_answer()
