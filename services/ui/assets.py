"""Static assets of the pages (the chat page, the swarm's status page), prepared once at start-up.

Each asset is kept with its content hash (ETag, and the ``?v=`` version in the page's links, so
versioned URLs can be cached for a year) and a gzip-compressed copy. Each page is rendered once
with its configuration and served with ``no-cache`` (revalidated by ETag).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import mimetypes
from dataclasses import dataclass
from pathlib import Path

STATIC_DIR = Path(__file__).with_name("static")
_MIN_COMPRESS_BYTES = 256


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


def load_static(directory: Path = STATIC_DIR) -> dict[str, Asset]:
    """Every file under ``static/`` except the pages' templates (``*.html``), by file name."""
    assets = {}
    for path in sorted(directory.iterdir()):
        if path.is_file() and path.suffix != ".html":
            content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            if content_type.startswith("text/") or content_type.endswith("javascript"):
                content_type += "; charset=utf-8"
            assets[path.name] = Asset.from_bytes(path.read_bytes(), content_type)
    return assets


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
