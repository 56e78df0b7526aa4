"""services/common/gunicorn/gthread_worker.py's corking: only answers of known length hold their segments."""

from __future__ import annotations

import socket
import threading
from types import SimpleNamespace

import pytest

from services.common.gunicorn.gthread_worker import Worker, set_cork

JSON = [("Content-Type", "application/json"), ("Content-Length", "2")]
STREAM = [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")]


@pytest.fixture
def server_socket():
    """The server's end of a loopback TCP connection."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    yield server
    server.close()
    client.close()


def corked(sock: socket.socket) -> bool:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK) == 1


@pytest.mark.parametrize(("headers", "expected"), [(JSON, True), (STREAM, False)], ids=["json", "stream"])
def test_only_an_answer_of_known_length_corks_its_connection(server_socket, headers, expected):
    worker = SimpleNamespace(_request=threading.local())  # what _corking uses of the worker
    started = []

    def app(environ, start_response):
        start_response("200 OK", headers)
        return [b"{}"]

    corking_app = Worker._corking(worker, app)
    body = corking_app({"gunicorn.socket": server_socket}, lambda *args: started.append(args))
    assert body == [b"{}"] and started == [("200 OK", headers, None)]
    assert corked(server_socket) is expected
    assert (getattr(worker._request, "corked", None) is server_socket) is expected


def test_set_cork_holds_and_releases(server_socket):
    set_cork(server_socket, True)
    assert corked(server_socket)
    set_cork(server_socket, False)
    assert not corked(server_socket)


def test_set_cork_leaves_a_closed_socket_alone(server_socket):
    server_socket.close()
    set_cork(server_socket, True)  # no error: the client went away
