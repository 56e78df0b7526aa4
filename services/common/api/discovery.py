"""Finding the inference replicas by themselves: ``INFERENCE_DISCOVERY`` (the gateway's replicas, a
replica's handover peers), resolved again every ``INFERENCE_DISCOVERY_INTERVAL_SECONDS``.

Each entry is one of:

- ``[MODEL=]dns://HOST:PORT``: every address ``HOST`` resolves to is a replica at
  ``http://ADDRESS:PORT`` (in Kubernetes, a model's headless Service publishing not-ready
  addresses). ``MODEL=`` names the model they serve, so the gateway knows the model while no
  replica of it runs (scaled to zero).
- ``file://ABSOLUTE_PATH``: a file of ``ID=http://HOST:PORT`` lines (``#`` comments), rewritten
  atomically by whoever starts and stops replicas (the local runner, deploy/local_stack.py).

Discovery yields URLs only: a replica's id is what its ``/readyz`` says (``replica_id``).
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from services.common.api.params import MODEL_NAME_PATTERN
from services.common.api.replica_urls import parse_replica_urls
from services.common.startup.config import ConfigError, Env

logger = logging.getLogger(__name__)
SETTING = "INFERENCE_DISCOVERY"
Resolver = Callable[[str, int], list[str]]  # (host, port) -> addresses; OSError when the name is unknown
_ENTRY = re.compile(r"^(?:(?P<model>[^=\s]+)=)?(?P<scheme>dns|file)://(?P<target>\S+)$")
_HOST_PORT = re.compile(r"^(?P<host>[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?):(?P<port>\d{1,5})$")


@dataclass(frozen=True)
class Found:
    """A replica's base URL, and the model its entry says it serves (None: unsaid)."""

    url: str
    model: str | None = None


@dataclass(frozen=True)
class DnsEntry:
    """``[MODEL=]dns://HOST:PORT``."""

    host: str
    port: int
    model: str | None = None

    def find(self, resolve: Resolver) -> list[Found]:
        try:
            addresses = resolve(self.host, self.port)
        except OSError as error:  # no such name: no replica now (a headless Service without endpoints)
            logger.debug("discovery: %s does not resolve (%s)", self.host, error)
            return []
        return [Found(f"http://{_bracketed(address)}:{self.port}", self.model) for address in addresses]


@dataclass(frozen=True)
class FileEntry:
    """``file://ABSOLUTE_PATH``: ``ID=http://HOST:PORT`` lines."""

    path: Path

    def find(self, resolve: Resolver) -> list[Found]:
        try:
            text = self.path.read_text()
        except OSError as error:
            logger.warning("discovery: cannot read %s (%s)", self.path, error.strerror)
            return []
        lines = tuple(line.split("#", 1)[0].strip() for line in text.splitlines())
        try:
            replicas = parse_replica_urls(tuple(line for line in lines if line), str(self.path))
        except ConfigError as error:
            logger.warning("discovery: %s", error)
            return []
        return [Found(url) for url in replicas.values()]


@dataclass(frozen=True)
class Discovery:
    """The parsed ``INFERENCE_DISCOVERY`` and its interval; empty: no discovery."""

    entries: tuple[DnsEntry | FileEntry, ...] = ()
    interval_s: float = 5.0

    def __bool__(self) -> bool:
        return bool(self.entries)

    def models(self) -> tuple[str, ...]:
        """The models named by ``MODEL=dns://`` entries, in order, once each."""
        return tuple(dict.fromkeys(e.model for e in self.entries if isinstance(e, DnsEntry) and e.model))

    def find(self, resolve: Resolver | None = None) -> list[Found]:
        """Every replica the entries give now, once per URL (blocking: DNS and file reads)."""
        found: dict[str, Found] = {}
        for entry in self.entries:
            for item in entry.find(resolve or resolve_addresses):
                found.setdefault(item.url, item)
        return list(found.values())


@dataclass
class Rediscovery:
    """When the entries are due to be resolved again: every interval, or sooner on demand."""

    interval_s: float
    clock: Callable[[], float] = time.monotonic
    _last: float | None = field(default=None, init=False)

    def due(self, soonest_s: float | None = None) -> bool:
        """Whether to resolve now (``soonest_s``: an earlier resolution on demand, at most this often)."""
        if self._last is None:
            return True
        return self.clock() - self._last >= min(self.interval_s, soonest_s or self.interval_s)

    def done(self) -> None:
        self._last = self.clock()


def resolve_addresses(host: str, port: int) -> list[str]:
    """The addresses ``host`` resolves to (the stdlib's getaddrinfo), in its order, once each."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def parse_discovery(env: Env) -> Discovery:
    """``INFERENCE_DISCOVERY`` and ``INFERENCE_DISCOVERY_INTERVAL_SECONDS``; ConfigError for a malformed entry."""
    interval = env.float("INFERENCE_DISCOVERY_INTERVAL_SECONDS", 5.0, minimum=0.1, maximum=3600.0)
    return Discovery(tuple(parse_entry(entry) for entry in env.list("INFERENCE_DISCOVERY")), interval)


def parse_entry(entry: str) -> DnsEntry | FileEntry:
    """One ``INFERENCE_DISCOVERY`` entry; ConfigError (one line) if malformed."""
    match = _ENTRY.match(entry)
    if match is None:
        raise ConfigError(f"{SETTING} entries are [MODEL=]dns://HOST:PORT or file://ABSOLUTE_PATH, got {entry!r}")
    model, target = match["model"], match["target"]
    if match["scheme"] == "file":
        if model is not None:
            raise ConfigError(f"{SETTING}: MODEL= goes with dns:// entries only, got {entry!r}")
        if not target.startswith("/"):
            raise ConfigError(f"{SETTING}: a file:// entry needs an absolute path (file:///...), got {entry!r}")
        return FileEntry(Path(target))
    if model is not None and not MODEL_NAME_PATTERN.match(model):
        raise ConfigError(f"{SETTING}: MODEL must be a model name (a replica's MODEL_NAME), got {entry!r}")
    host_port = _HOST_PORT.match(target)
    if host_port is None or not 1 <= int(host_port["port"]) <= 65535:
        raise ConfigError(f"{SETTING}: a dns:// entry is dns://HOST:PORT (a DNS name, a port), got {entry!r}")
    return DnsEntry(host_port["host"], int(host_port["port"]), model)


def _bracketed(address: str) -> str:
    """An address as a URL's host: IPv6 in brackets."""
    return f"[{address}]" if isinstance(ipaddress.ip_address(address.split("%")[0]), ipaddress.IPv6Address) else address
