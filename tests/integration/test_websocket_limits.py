"""The WebSocket API's memory bounds, on a real gateway (gunicorn, Uvicorn worker) on loopback with a real
WebSocket client (the ``websockets`` library): the message size that fits the API and the connections per
client. No replica is needed (none of this reaches one), so no swarm either.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import time
from collections.abc import Iterator
from contextlib import ExitStack

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection

from client.api import connect_ws
from deploy.local_stack import ServiceProcess, gateway_process, pick_free_port
from services.common.api.params import Limits
from services.gateway.socket_protocol import largest_message_bytes

CONNECTIONS = 3  # WS_MAX_CONNECTIONS_PER_CLIENT here
LIMIT = largest_message_bytes(Limits())  # WS_MAX_MESSAGE_BYTES' default
TRY_AGAIN_LATER, MESSAGE_TOO_BIG = 1013, 1009
PROXY = "127.0.0.2"  # TRUSTED_PROXIES here: an Ingress controller's address


@pytest.fixture(scope="module")
def gateway(artifacts_dir) -> Iterator[ServiceProcess]:
    """One worker (the connection limit is per worker), routing to a replica that is not there, behind a proxy."""
    env = {"GUNICORN_WORKERS": "1", "WS_MAX_CONNECTIONS_PER_CLIENT": str(CONNECTIONS), "TRUSTED_PROXIES": PROXY}
    process = gateway_process(replicas={"inference-0": "http://127.0.0.1:9"}, port=pick_free_port(),
                              log_path=artifacts_dir / "logs" / "gateway-ws-limits.log", extra_env=env)  # fmt: skip
    yield process.start_ready(timeout=60, path="/healthz")
    process.stop()


def closed_with(ws: ClientConnection, timeout: float = 10) -> tuple[list[dict], int | None]:
    """The messages the server sends until it closes, and its close code."""
    received = []
    try:
        while True:
            received.append(json.loads(ws.recv(timeout=timeout)))
    except ConnectionClosed as closed:
        return received, closed.rcvd.code if closed.rcvd else None


def generate(inputs: str) -> str:
    return json.dumps({"type": "generate", "inputs": inputs, "max_new_tokens": 1})


def test_the_largest_valid_message_is_read_and_a_larger_one_refused(gateway):
    with connect_ws(gateway.port, max_size=None) as ws:
        largest = generate("\U0001f600" * Limits().max_input_chars)  # 12 bytes a character, escaped
        assert len(largest) <= LIMIT
        ws.send(largest)
        assert "Open a session first" in json.loads(ws.recv(timeout=10))["traceback"]  # read, not refused for size
        ws.send(generate("x" * LIMIT))
        assert f"the limit is {LIMIT}" in json.loads(ws.recv(timeout=10))["traceback"]  # refused, still open
        ws.send(generate("x" * (2 * LIMIT)))  # over the transport's limit (was 4 MiB): not read
        assert closed_with(ws) == ([], MESSAGE_TOO_BIG)


def test_a_partial_message_announcing_more_than_the_limit_is_refused_unread(gateway):
    """A frame header announcing 1 MiB (under the 4 MiB it used to accept): closed 1009 at once, before any
    of the payload the client could trickle in, so nothing of it is buffered."""
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall(f"GET /api/v2/generate HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())  # fmt: skip
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(4096)
        assert head.startswith(b"HTTP/1.1 101"), head
        sock.sendall(struct.pack("!BBQ", 0x81, 0x80 | 127, 1 << 20) + os.urandom(4) + b'{"type": "gen')
        frame = head.partition(b"\r\n\r\n")[2] or sock.recv(4096)
        assert frame[0] == 0x88 and struct.unpack("!H", frame[2:4])[0] == MESSAGE_TOO_BIG, frame


def test_one_client_holds_at_most_its_connections(gateway):
    with ExitStack() as held:
        sockets = [held.enter_context(connect_ws(gateway.port)) for _ in range(CONNECTIONS)]
        with connect_ws(gateway.port) as extra:  # the handshake succeeds; then the API's error and a close
            messages, code = closed_with(extra)
        assert code == TRY_AGAIN_LATER
        assert messages == [{"ok": False, "traceback": f"This client already holds {CONNECTIONS} connections "
                                                       "(WS_MAX_CONNECTIONS_PER_CLIENT): close one first"}]  # fmt: skip
        with connect_ws(gateway.port, source_address=("127.0.0.4", 0)) as other:  # another client is served
            other.send(generate("Hi"))
            assert "Open a session first" in json.loads(other.recv(timeout=10))["traceback"]
        for ws in sockets:  # the held ones are served as before
            ws.send(generate("Hi"))
            assert "Open a session first" in json.loads(ws.recv(timeout=10))["traceback"]
        sockets.pop().close()
        deadline = time.monotonic() + 10
        while True:  # the server counts the closed one off as soon as it has seen it close
            with connect_ws(gateway.port) as again:
                again.send(generate("Hi"))
                try:
                    if "Open a session first" in json.loads(again.recv(timeout=10))["traceback"]:
                        break
                except ConnectionClosed:
                    pass
            assert time.monotonic() < deadline, "a closed connection still counts"
            time.sleep(0.2)


def refused(ws: ClientConnection) -> bool:
    """Whether the gateway refused this connection for its client's connection limit."""
    try:
        ws.send(generate("Hi"))
        return "WS_MAX_CONNECTIONS_PER_CLIENT" in json.loads(ws.recv(timeout=10))["traceback"]
    except ConnectionClosed as closed:
        return closed.rcvd is not None and closed.rcvd.code == TRY_AGAIN_LATER


def test_x_forwarded_for_names_the_client_only_from_a_trusted_proxy(gateway):
    """From TRUSTED_PROXIES, each forwarded address is a client of its own; from any other peer the header is
    the client's own to write, so it cannot dodge its limit by naming other addresses."""
    with ExitStack() as held:

        def connect(source: str, forwarded: str) -> ClientConnection:
            headers = {"X-Forwarded-For": forwarded}
            return held.enter_context(connect_ws(gateway.port, source_address=(source, 0), additional_headers=headers))

        spoofed = [connect("127.0.0.3", f"1.2.3.4, 198.51.100.{i}") for i in range(CONNECTIONS + 1)]
        assert [refused(ws) for ws in spoofed] == [False] * CONNECTIONS + [True]
        proxied = [connect(PROXY, f"1.2.3.4, 198.51.100.{i}") for i in range(CONNECTIONS + 1)]
        assert not any(refused(ws) for ws in proxied)  # one client each
        same = [connect(PROXY, "203.0.113.7") for _ in range(CONNECTIONS + 1)]
        assert [refused(ws) for ws in same] == [False] * CONNECTIONS + [True]  # one client behind the proxy
