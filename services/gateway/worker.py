"""The gateway's gunicorn worker: Uvicorn's (an asyncio event loop, uvloop), serving the ASGI app.

Every connection, idle or streaming, plain HTTP or WebSocket, is a socket on the loop, not a
thread. HTTP is parsed by httptools with gunicorn's bounds on request heads (http_protocol.py),
WebSockets by the websockets library, without per-message compression (its zlib contexts cost
hundreds of KiB per connection) and with a transport limit of 2x ``WS_MAX_MESSAGE_BYTES``: a
larger message closes the connection (code 1009) as soon as a frame header announces it, or its
fragments add up to it; a smaller one over the limit gets an error answer from the app
(websocket.py). That bounds what a connection buffers: the websockets parser holds at most the
limit of one partial message, and uvicorn's sans-I/O protocol stops reading a connection while a
complete message waits for the app (one at a time: ``ws_max_queue`` is the legacy
implementation's, set to 1 all the same).
"""

from __future__ import annotations

from typing import Any

from uvicorn_worker import UvicornWorker

from services.common.startup.config import load_or_exit
from services.gateway.http_protocol import HttpProtocol, WebSocketProtocol
from services.gateway.settings import GatewaySettings

WS_TRANSPORT_FACTOR = 2


class Worker(UvicornWorker):
    """``uvicorn_worker.UvicornWorker`` with the gateway's protocol settings."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        settings = load_or_exit(GatewaySettings.from_env, "gateway")
        self.CONFIG_KWARGS = {
            "loop": "uvloop",
            "http": HttpProtocol,
            "ws": WebSocketProtocol,  # uvicorn's "websockets-sansio", refusing handshakes with JSON
            "ws_max_size": WS_TRANSPORT_FACTOR * settings.ws_max_message_bytes,
            "ws_max_queue": 1,
            "ws_per_message_deflate": False,
            "ws_ping_interval": 20.0,  # a peer that vanished without closing is found within ~40 s
            "ws_ping_timeout": 20.0,
            "lifespan": "on",
            "proxy_headers": False,  # clients are told apart by TRUSTED_PROXIES, the app's own setting
            "server_header": False,
        }
        super().__init__(*args, **kwargs)
