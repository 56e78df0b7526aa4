"""The swarm's status page as the ui serves it: a page of its own at /swarm, static files only, no
inline script (the page's Content-Security-Policy), its assets versioned like the chat page's."""

from __future__ import annotations

import re

import falcon.testing

from services.common.startup.config import Env
from services.ui.app import build_app
from services.ui.assets import load_static
from services.ui.settings import UiSettings


def test_the_status_page_is_static_with_no_inline_script():
    client = falcon.testing.TestClient(build_app(UiSettings.from_env(Env({"API_BASE_URL": "/base"})), load_static()))
    page = client.simulate_get("/swarm")
    assert page.status_code == 200 and page.headers["Cache-Control"] == "no-cache"
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    scripts = re.findall(r"<script([^>]*)>", page.text)
    assert len(scripts) == 2
    for attributes in scripts:  # each script a file, or data the page reads (not run)
        assert 'src="/static/' in attributes or 'type="application/json"' in attributes
    assert '{"apiBaseUrl": "/base"}' in page.text
    assets = re.findall(r'(?:href|src)="(/static/[^"]+)"', page.text)
    assert {asset.split("?")[0] for asset in assets} == {"/static/swarm.css", "/static/swarm_page.js"}
    for asset in assets:
        answer = client.simulate_get(asset.split("?")[0], query_string=asset.split("?")[1])
        assert answer.status_code == 200 and "immutable" in answer.headers["Cache-Control"]
    assert client.simulate_get("/static/swarm.html").status_code == 404  # a page, not an asset
