"""The ui service: serves the chat page, the swarm's status page (``/swarm``) and their static assets,
nothing else.

Security headers: the page's Content-Security-Policy lets it load its own script, style and
icon and talk to its API (same origin, or ``API_BASE_URL``'s), nothing inline, no framing.

Caching: the page is ``no-cache`` (always revalidated, 304 by ETag); assets requested with
their content version (``?v=<hash>``, as the page links them) are cacheable for a year and
immutable; any other asset request is revalidated. Responses are gzip-compressed for clients
that accept it.
"""

from __future__ import annotations

import falcon

from services.common.startup.config import load_or_exit
from services.common.web.app import configure_logging
from services.common.web.app import create_app as create_base_app
from services.ui.assets import Asset, load_static, render_page
from services.ui.settings import UiSettings

IMMUTABLE = "public, max-age=31536000, immutable"
SWARM_PAGE = "/swarm"  # the swarm's status page (GET /api/v2/swarm in view)
REVALIDATE = "no-cache"


def send_asset(req: falcon.Request, resp: falcon.Response, asset: Asset, cache_control: str) -> None:
    """Answer with an asset: ETag/304, Cache-Control, gzip when accepted."""
    resp.cache_control = [cache_control]
    resp.etag = asset.etag
    resp.vary = ["Accept-Encoding"]
    resp.content_type = asset.content_type
    if any(tag in (asset.digest, "*") for tag in req.if_none_match or []):  # Falcon strips the quotes
        resp.status = falcon.HTTP_304
        return
    if asset.gzipped is not None and "gzip" in (req.get_header("Accept-Encoding") or ""):
        resp.set_header("Content-Encoding", "gzip")
        resp.data = asset.gzipped
    else:
        resp.data = asset.body


class PageResource:
    """``GET /``: the chat page; ``GET /swarm``: the swarm's status page."""

    def __init__(self, page: Asset) -> None:
        self._page = page

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        send_asset(req, resp, self._page, REVALIDATE)


class StaticResource:
    """``GET /static/{name}``: CSS and JavaScript of the page."""

    def __init__(self, assets: dict[str, Asset]) -> None:
        self._assets = assets

    def on_get(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        asset = self._assets.get(name)
        if asset is None:
            raise falcon.HTTPNotFound(description=f"No static file {name!r}")
        versioned = req.get_param("v") == asset.digest
        send_asset(req, resp, asset, IMMUTABLE if versioned else REVALIDATE)


def page_csp(api_base_url: str) -> str:
    """The page's Content-Security-Policy: its own files, its API's origin, nothing inline or framed."""
    api_origin = " " + "/".join(api_base_url.split("/", 3)[:3]) if api_base_url.startswith("http") else ""
    return (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        f"connect-src 'self'{api_origin}; frame-ancestors 'none'; object-src 'none'; base-uri 'none'; "
        "form-action 'self'"
    )


def build_app(settings: UiSettings, assets: dict[str, Asset]) -> falcon.App:
    """The ui's WSGI app, serving ``assets`` (``load_static``'s)."""
    chat_config = {
        "apiBaseUrl": settings.api_base_url,
        "sessionMaxLength": settings.session_max_length,
    }
    app = create_base_app(readiness=lambda: (True, {"detail": "ready"}), debug_tracebacks=False,
                          content_security_policy=page_csp(settings.api_base_url))  # fmt: skip
    app.add_route("/", PageResource(render_page(assets, chat_config)))
    swarm_config = {"apiBaseUrl": settings.api_base_url}
    app.add_route(SWARM_PAGE, PageResource(render_page(assets, swarm_config, name="swarm.html")))
    app.add_route("/static/{name}", StaticResource(assets))
    return app


def create_app() -> falcon.App:
    """gunicorn's app factory."""
    settings = load_or_exit(UiSettings.from_env, "ui")
    assets = load_or_exit(load_static, "ui")
    configure_logging(settings.server.log_level)
    return build_app(settings, assets)
