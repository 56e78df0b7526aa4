"""Lists of inference replicas in settings: ``<replica id>=http://host:port`` entries (the gateway's
``INFERENCE_REPLICAS``, a replica's ``INFERENCE_PEERS``)."""

from __future__ import annotations

import re

from services.common.api.params import SESSION_ID_PATTERN
from services.common.startup.config import ConfigError


def parse_replica_urls(entries: tuple[str, ...], setting: str) -> dict[str, str]:
    """Replica id -> base URL; ConfigError naming ``setting`` for a malformed or repeated entry."""
    replicas: dict[str, str] = {}
    for entry in entries:
        name, sep, url = entry.partition("=")
        if not sep or not SESSION_ID_PATTERN.match(name) or not re.match(r"^https?://[^/\s]+$", url.rstrip("/")):
            raise ConfigError(f"{setting} entry must be ID=http://HOST:PORT, got {entry!r}")
        if name in replicas:
            raise ConfigError(f"{setting} names {name!r} twice")
        replicas[name] = url.rstrip("/")
    return replicas
