"""Static assets of the pages (the chat page, the swarm's status page), prepared once at start-up.

Two sources: the page's own files (``static/``) and the browser libraries it imports (Markdown,
sanitiser, highlighter), read from ``node_modules`` where ``npm ci`` installed the versions
``package-lock.json`` pins (``make setup``, the ui image build). Nothing comes from a CDN.

Each asset is kept with its content hash (ETag, and the ``?v=`` version in the page's links, so
versioned URLs can be cached for a year) and a gzip-compressed copy. Each page is rendered once
with its configuration and served with ``no-cache`` (revalidated by ETag).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import mimetypes
import re
from dataclasses import dataclass
from pathlib import Path

from services.common.startup.config import ConfigError

STATIC_DIR = Path(__file__).with_name("static")
NODE_MODULES = Path(__file__).with_name("node_modules")
# The libraries the page imports, by the name it imports them as (package.json pins them).
LIBRARIES = {
    "marked.js": "marked/lib/marked.esm.js",
    "purify.js": "dompurify/dist/purify.es.mjs",
    "highlight.js": "@highlightjs/cdn-assets/es/highlight.min.js",
}
_MIN_COMPRESS_BYTES = 256
_SIBLING_IMPORT = re.compile(r'^(import .* from "\./)([\w.-]+)(";)$', re.MULTILINE)


@dataclass(frozen=True)
class Asset:
    """One servable file: its bytes, gzip bytes, type and content hash."""

    body: bytes
    gzipped: bytes | None
    content_type: str
    digest: str

    @property
    def etag(self) -> str:
        return f'"{self.digest}"'

    @classmethod
    def from_bytes(cls, body: bytes, content_type: str) -> Asset:
        compressed = gzip.compress(body, compresslevel=9, mtime=0) if len(body) >= _MIN_COMPRESS_BYTES else None
        return cls(body, compressed, content_type, hashlib.sha256(body).hexdigest()[:16])


def _asset_of_file(name: str, path: Path) -> Asset:
    content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    if content_type.startswith("text/") or content_type.endswith("javascript"):
        content_type += "; charset=utf-8"
    return Asset.from_bytes(path.read_bytes(), content_type)


def load_libraries(node_modules: Path = NODE_MODULES) -> dict[str, Asset]:
    """The installed browser libraries, by the name the page imports them as; ConfigError if one is missing."""
    missing = [file for file in LIBRARIES.values() if not (node_modules / file).is_file()]
    if missing:
        raise ConfigError(f"{node_modules / missing[0]} is missing: install the page's libraries with `make setup` "
                          f"(npm ci --prefix services/ui)")  # fmt: skip
    return {name: _asset_of_file(name, node_modules / file) for name, file in LIBRARIES.items()}


def load_static(directory: Path = STATIC_DIR, node_modules: Path = NODE_MODULES) -> dict[str, Asset]:
    """Every file under ``static/`` except the pages' templates (``*.html``), and the libraries, by file name; the
    page's modules import each other and the libraries by versioned URL (``_version_imports``)."""
    assets = load_libraries(node_modules)
    own = []
    for path in sorted(directory.iterdir()):
        if path.is_file() and path.suffix != ".html":
            assets[path.name] = _asset_of_file(path.name, path)
            own.append(path.name)
    versioned: dict[str, Asset] = {name: assets[name] for name in LIBRARIES}
    for name in own:
        _version_imports(name, assets, versioned)
    return versioned


def _version_imports(name: str, assets: dict[str, Asset], versioned: dict[str, Asset]) -> Asset:
    """``name`` with its imports of sibling modules pointing at their versioned URLs (``?v=<hash>``,
    their own imports versioned first), so that a module changes URL when anything it loads
    changes, and a cached page loads every module from the cache without asking."""
    if name not in versioned:
        asset = assets[name]
        if name.endswith(".js"):
            text = _SIBLING_IMPORT.sub(
                lambda m: f"{m[1]}{m[2]}?v={_version_imports(m[2], assets, versioned).digest}{m[3]}",
                asset.body.decode("utf-8"),
            )
            asset = Asset.from_bytes(text.encode("utf-8"), asset.content_type)
        versioned[name] = asset
    return versioned[name]


def render_page(
    assets: dict[str, Asset], config: dict, name: str = "index.html", directory: Path = STATIC_DIR
) -> Asset:
    """A page (the chat page by default) with versioned asset links and its configuration embedded."""
    page = (directory / name).read_text(encoding="utf-8")
    for name, asset in assets.items():
        page = page.replace(f"{{{{ {name} }}}}", f"/static/{name}?v={asset.digest}")
    config_json = json.dumps(config).replace("</", "<\\/")  # never closes the <script> early
    page = page.replace("{{ config }}", config_json)
    return Asset.from_bytes(page.encode("utf-8"), "text/html; charset=utf-8")
