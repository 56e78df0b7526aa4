"""Forwarding of the chat page's paths to the ui service (what the Ingress does in Kubernetes).

With ``UI_URL`` set, the gateway answers every path that is not its own (``/api/...``, ``/v1/...``,
``/healthz``, ``/readyz``, ``/metrics``) from the ui service, so that ``make run`` serves the page
and the API on one origin. Caching, compression and security headers (the page's
Content-Security-Policy, not the API's) pass through unchanged.
"""

from __future__ import annotations

import falcon
import falcon.asgi

from services.common.web.app import SECURITY_HEADERS
from services.common.web.errors import ServiceUnavailable
from services.gateway.upstream import ReplicaUnreachable, UiCall, Upstream

UI_PATHS = r"/(?!api/|v1/|healthz$|readyz$|metrics$)"
_REQUEST_HEADERS = ("Accept", "Accept-Encoding", "If-None-Match")
_RESPONSE_HEADERS = ("Content-Encoding", "ETag", "Cache-Control", "Vary", "Last-Modified", *SECURITY_HEADERS)


class UiProxy:
    """A Falcon sink relaying GET and HEAD to the ui service."""

    def __init__(self, upstream: Upstream, ui_url: str) -> None:
        self._upstream = upstream
        self._ui_url = ui_url

    async def __call__(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, **params: str) -> None:
        if req.method not in ("GET", "HEAD"):
            raise falcon.HTTPMethodNotAllowed(["GET", "HEAD"])
        headers = {name: req.get_header(name) for name in _REQUEST_HEADERS if req.get_header(name)}
        try:
            page = await self._upstream.request(
                "ui", self._ui_url, req.method, req.relative_uri, headers=headers, metrics=UiCall()
            )
        except ReplicaUnreachable as error:
            raise ServiceUnavailable("The chat page is temporarily unavailable; retry in a few seconds") from error
        resp.status = page.status
        resp.content_type = page.headers.get("Content-Type", "application/octet-stream")
        for name in _RESPONSE_HEADERS:
            if name in page.headers:
                resp.set_header(name, page.headers[name])
        resp.data = page.data
