"""The threaded worker's keep-alive fast path (services/common/gunicorn/gthread_worker.py), on a real
gunicorn: an inference replica (the one service that runs it), one worker, debug logs. A kept-alive
connection's next request is served by the thread that answered the last one when it comes at
once, by gunicorn's poller when it comes later; either way every answer is right, and a stop is
not held up. An answer of known length reaches its client in one TCP segment.
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from deploy.local_stack import ServiceProcess
from services.common.gunicorn.gthread_worker import NEXT_REQUEST_WAIT_S
from tests.helpers import start_inference

SAME_THREAD = "serving the next request of"


@pytest.fixture(scope="module")
def replica_debug(swarm, model_dir, artifacts_dir) -> Iterator[ServiceProcess]:
    env = {"LOG_LEVEL": "debug", "GUNICORN_WORKERS": "1", "GUNICORN_THREADS": "8"}
    service = start_inference(swarm, model_dir, artifacts_dir, "inference-threaded-worker", **env)
    yield service
    service.stop()


def same_thread_count(service: ServiceProcess) -> int:
    return service.log_path.read_text(errors="replace").count(SAME_THREAD)


def get_many(service: ServiceProcess, count: int, pause_s: float) -> list[tuple[int, bytes]]:
    """``count`` GET /healthz on one kept-alive connection, ``pause_s`` apart."""
    connection = http.client.HTTPConnection("127.0.0.1", service.port, timeout=30)
    answers = []
    try:
        for _ in range(count):
            connection.request("GET", "/healthz")
            response = connection.getresponse()
            answers.append((response.status, response.read()))
            time.sleep(pause_s)
    finally:
        connection.close()
    return answers


def test_back_to_back_requests_are_served_on_the_same_thread(replica_debug):
    before = same_thread_count(replica_debug)
    answers = get_many(replica_debug, 40, pause_s=0)
    expected = answers[0]
    assert expected[0] == 200 and b"ok" in expected[1]
    assert answers == [expected] * 40
    time.sleep(0.5)  # the log is written by another process
    assert same_thread_count(replica_debug) > before


def test_requests_after_a_pause_go_through_the_poller_and_are_answered(replica_debug):
    before = same_thread_count(replica_debug)
    answers = get_many(replica_debug, 5, pause_s=NEXT_REQUEST_WAIT_S * 40)
    assert [status for status, _ in answers] == [200] * 5
    assert len(set(answers)) == 1
    time.sleep(0.5)
    assert same_thread_count(replica_debug) == before  # none waited for: each came back through the poller


def test_pipelined_requests_are_all_answered(replica_debug):
    """Two requests in one write: the second is read ahead with the first, then served."""
    head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    with socket.create_connection(("127.0.0.1", replica_debug.port), timeout=30) as sock:
        sock.sendall(head + b"\r\n" + head + b"Connection: close\r\n\r\n")
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert received.count(b"HTTP/1.1 200 OK") == 2


def test_a_client_calling_back_to_back_does_not_hold_up_a_stop(swarm, model_dir, artifacts_dir):
    """The thread serving it stops waiting for its next request once the worker stops."""
    service = start_inference(swarm, model_dir, artifacts_dir, "inference-threaded-worker-stop")
    statuses: list[int] = []
    ended = threading.Event()

    def call_until_closed() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", service.port, timeout=30)
        try:
            while True:
                connection.request("GET", "/healthz")
                response = connection.getresponse()
                statuses.append(response.status)
                response.read()
        except (OSError, http.client.HTTPException):
            pass  # the stopping server closed the connection
        finally:
            connection.close()
            ended.set()

    caller = threading.Thread(target=call_until_closed, daemon=True)
    try:
        caller.start()
        while len(statuses) < 20 and not ended.is_set():
            time.sleep(0.01)
        assert len(statuses) >= 20, service.log_tail()
        started = time.monotonic()
        assert service.stop(timeout=60) == 0
        assert time.monotonic() - started < 10  # not the 60 s graceful timeout
        assert ended.wait(10)
        assert set(statuses) == {200}
    finally:
        service.stop()


def data_segments_received(sock: socket.socket) -> int:
    """``tcpi_data_segs_in`` of Linux's ``struct tcp_info``: data segments this socket has received."""
    return struct.unpack_from("I", sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256), 152)[0]


def test_an_answer_of_known_length_arrives_in_one_segment(replica_debug):
    """gunicorn writes the head and the body with two sends; corked, they leave as one segment."""
    request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    with socket.create_connection(("127.0.0.1", replica_debug.port), timeout=30) as sock:
        for _ in range(5):  # on one kept-alive connection: each answer is uncorked once sent
            before = data_segments_received(sock)
            sock.sendall(request)
            response = b""
            while b"\r\n\r\n" not in response or len(response) < answer_length(response):
                response += sock.recv(65536)
            assert response.startswith(b"HTTP/1.1 200 OK") and response.endswith(b'{"ok": true}')
            assert data_segments_received(sock) - before == 1


def answer_length(response: bytes) -> int:
    """The whole answer's length, from its head's Content-Length."""
    head, _, _ = response.partition(b"\r\n\r\n")
    length = next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
    return len(head) + 4 + int(length.split(b":")[1])
