"""API keys (optional) and who a request's client is.

Keys are off unless the operator lists some (``API_KEYS`` and/or ``API_KEYS_FILE``: ``id:key``
entries). With keys on, every route needs one, deny by default, except the resources marked
``public = True`` (health, readiness, metrics, the OpenAPI document): the decision is the matched
resource's, never the path's text, so every spelling of a path that Falcon routes to a resource
(``//api/v1/generate``, a trailing slash, ``%2F``) is checked as the resource is. Paths that match
no resource are not served (404, or the page's paths, relayed to the ui). A key is sent as
``Authorization: Bearer <key>`` (what the OpenAI clients send), ``X-API-Key: <key>``, or, on the
WebSocket handshake only (a browser's WebSocket cannot set headers), as the subprotocols
``["petals-chat", "bearer.<key>"]`` (the handshake's answer names ``petals-chat``, never the key) or,
kept for compatibility, ``?api_key=<key>``. Keys are redacted from log lines in every spelling.
A key is compared with every configured key in constant time; only its id is ever named (logs,
metrics, rate limits, session quotas). ``ANONYMOUS_RATE_LIMIT_PER_MINUTE`` > 0 lets requests that
bring no key in too, as anonymous clients told apart by address, at that rate (a wrong key is
refused all the same). Refused keys are throttled per address (``AUTH_FAILURES_PER_MINUTE``, see
``RefusalThrottle`` in ratelimit.py).

Every request gets a ``ClientIdentity`` (``req.context.client``): its key id, or its address
(``X-Forwarded-For``'s last entry, the one the Ingress added, when the peer is one of ``TRUSTED_PROXIES``).
"""

from __future__ import annotations

import ipaddress
import logging
import re
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from services.common.web.errors import ApiError, Unauthorized, render_error
from services.common.web.request_id import handshake_headers
from services.gateway.api_keys import ANONYMOUS, REFUSED, KeyRing
from services.gateway.metrics import CLIENT_REQUESTS
from services.gateway.settings import IpNetwork

if TYPE_CHECKING:
    from services.gateway.ratelimit import RefusalThrottle

KEY_QUERY_PARAM = "api_key"
SUBPROTOCOL = "petals-chat"  # the WebSocket subprotocol a handshake is answered with, when offered
KEY_SUBPROTOCOL = "bearer."  # a key offered as a subprotocol: bearer.<key>
POLICY_VIOLATION = 1008  # WebSocket close code after a refused key
_QUERY_FIELD = re.compile(r"(?<![^\s?&;\"'(])([\w%.+-]+=)([^&\s\"']*)")  # name=value in a URL or a line
_BEARER = re.compile(r"(?i)(bearer[.\s]\s*)[^\s,\"']+")  # an Authorization value or a subprotocol


@dataclass(frozen=True)
class ClientIdentity:
    """Who sent a request: a key id (keys on), else an address."""

    key_id: str | None
    address: str

    @property
    def name(self) -> str:
        """The client as rate limits and session quotas count it."""
        return f"key:{self.key_id}" if self.key_id else f"ip:{self.address}"

    @property
    def label(self) -> str:
        """The bounded metric label: a configured key id, or ``anonymous``."""
        return self.key_id or ANONYMOUS


def is_public(resource: object) -> bool:
    """Whether a matched resource is open to everyone: only one marked ``public = True`` is."""
    return getattr(resource, "public", False) is True


def client_address(req: Any, trusted_proxies: Sequence[IpNetwork]) -> str:
    """The client's address: when the peer is a trusted proxy, the last ``X-Forwarded-For`` entry (the
    one that proxy added; earlier ones are the client's to write), else the peer's."""
    peer = req.remote_addr or "unknown"
    if is_trusted(peer, trusted_proxies):
        forwarded = (req.get_header("X-Forwarded-For") or "").rsplit(",", 1)[-1].strip()
        try:
            return str(ipaddress.ip_address(forwarded))
        except ValueError:
            pass
    return peer


def is_trusted(peer: str, trusted_proxies: Sequence[IpNetwork]) -> bool:
    """Whether the peer's address is in one of ``trusted_proxies`` (an IPv4-mapped IPv6 one as IPv4)."""
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return any(address in network for network in trusted_proxies)


def presented_key(req: Any, *, websocket: bool) -> str | None:
    """The key a request brings: Bearer, X-API-Key or (WebSocket handshakes only) ``api_key``."""
    scheme, _, value = (req.get_header("Authorization") or "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    key = req.get_header("X-API-Key")
    if key:
        return key.strip()
    if not websocket:
        return None
    offered = [key for key in offered_subprotocols(req) if key.startswith(KEY_SUBPROTOCOL)]
    return offered[0].removeprefix(KEY_SUBPROTOCOL) if offered else req.get_param(KEY_QUERY_PARAM)


def offered_subprotocols(req: Any) -> list[str]:
    """The subprotocols a WebSocket handshake offers (``Sec-WebSocket-Protocol``)."""
    return [name.strip() for name in (req.get_header("Sec-WebSocket-Protocol") or "").split(",") if name.strip()]


def accepted_subprotocol(req: Any) -> str | None:
    """What a handshake is answered with: ``petals-chat`` if offered (a browser that offered
    subprotocols drops a connection whose answer names none), never a key."""
    return SUBPROTOCOL if SUBPROTOCOL in offered_subprotocols(req) else None


class ClientMiddleware:
    """Identifies every API request's client and, with keys on, refuses a missing or wrong key
    (401 in the route's error envelope; on the WebSocket an error message, then close 1008).
    Counts API requests per key id."""

    def __init__(
        self,
        keys: KeyRing,
        *,
        anonymous: bool,
        trusted_proxies: Sequence[IpNetwork],
        refusals: RefusalThrottle | None = None,
    ) -> None:
        self._keys = keys
        self._anonymous = anonymous or not keys
        self._trusted_proxies = tuple(trusted_proxies)
        self._refusals = refusals

    async def process_resource_async(self, req: Any, resp: Any, resource: object, params: dict) -> None:
        if resource is not None and req.method != "OPTIONS":  # a CORS preflight carries no key
            self._identify(req, websocket=False, api=not is_public(resource))

    async def process_resource_ws(self, req: Any, ws: Any, resource: object, params: dict) -> None:
        if resource is not None:
            self._identify(req, websocket=True, api=not is_public(resource))

    async def process_response_async(self, req: Any, resp: Any, resource: object, req_succeeded: bool) -> None:
        if req.context.get("api_request"):
            status = resp.context.get("error_status") or resp.status
            CLIENT_REQUESTS.labels(key_id=req.context.client.label, status=str(status).split()[0]).inc()

    def _identify(self, req: Any, *, websocket: bool, api: bool) -> None:
        """Set ``req.context.client``; on an API route with keys on, check the key."""
        address = client_address(req, self._trusted_proxies)
        key_id = None
        if api and self._keys:
            key_id = self._check_key(presented_key(req, websocket=websocket), address)
        req.context.client = ClientIdentity(key_id, address)
        req.context.api_request = api and not websocket  # a WebSocket's messages are counted by the connection

    def _check_key(self, key: str | None, address: str) -> str | None:
        """The id of ``key``; None for an anonymous client; Unauthorized (or RateLimited, for an address
        refused too often) otherwise."""
        if key is None and self._anonymous:
            return None
        if self._refusals is not None:
            try:
                self._refusals.check(address)
            except ApiError:
                CLIENT_REQUESTS.labels(key_id=REFUSED, status="429").inc()
                raise
        key_id = self._keys.identify(key) if key else None
        if key_id is None:
            CLIENT_REQUESTS.labels(key_id=REFUSED, status="401").inc()
            if self._refusals is not None:
                self._refusals.refused(address)
            reason = "The API key is not valid" if key else "This API needs a key"
            raise Unauthorized(
                f"{reason}: send it as 'Authorization: Bearer <key>'", headers={"WWW-Authenticate": "Bearer"}
            )
        return key_id


async def handle_unauthorized(req: Any, resp: Any, error: Unauthorized, params: dict, ws: Any = None) -> None:
    """Falcon error handler of Unauthorized: the route's envelope, or on a WebSocket the API's own
    error message (which a browser can read, unlike a refused handshake's status), then close 1008."""
    if ws is None:
        render_error(req, resp, error)
        return
    await ws.accept(subprotocol=accepted_subprotocol(req), headers=handshake_headers(req))
    await ws.send_media({"ok": False, "traceback": error.message})
    await ws.close(POLICY_VIOLATION)


class RedactKeys(logging.Filter):
    """Removes keys from log lines (Uvicorn logs each WebSocket handshake's query): the value of any
    field whose name, percent-decoded and in any case, is ``api_key``, and what follows ``Bearer``."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = _BEARER.sub(r"\1[redacted]", _QUERY_FIELD.sub(_redact_field, message))
        if redacted != message:
            record.msg, record.args = redacted, ()
        return True


def _redact_field(match: re.Match) -> str:
    name = match.group(1)
    for _ in range(3):  # percent-encoded, perhaps more than once
        name = urllib.parse.unquote_plus(name)
    return match.group(1) + "[redacted]" if name.lower() == f"{KEY_QUERY_PARAM}=" else match.group(0)


def redact_server_logs() -> None:
    """Install RedactKeys on the loggers of the server (Uvicorn, gunicorn) and the root's handlers."""
    for name in ("uvicorn.error", "uvicorn.access", "gunicorn.error", "gunicorn.access"):
        logging.getLogger(name).addFilter(RedactKeys())
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactKeys())
