"""The operator's API keys (``API_KEYS``, ``API_KEYS_FILE``): ``id:key`` entries, validated at start-up.

Errors name an entry by its number and id, never its key. A weak key (too few distinct characters,
or too repetitive for its length) is refused. Lookups compare the key with every
configured key in constant time. ``KeyRing`` re-reads ``API_KEYS_FILE`` when it changes (a
rotated Kubernetes Secret), at most every ``API_KEYS_RELOAD_SECONDS``. (No metrics here: the
settings import this before the gateway's workers have their multiprocess metrics directory.)
"""

from __future__ import annotations

import hmac
import logging
import math
import os
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from services.common.startup.config import ConfigError, Env

logger = logging.getLogger(__name__)

KEY_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")
KEY_PATTERN = re.compile(r"^[\x21-\x7e]+$")  # printable ASCII, no spaces
MIN_KEY_CHARS = 16
MAX_KEY_CHARS = 256
MIN_KEY_DISTINCT = 8  # distinct characters
MIN_KEY_BITS = 40.0  # length x the Shannon entropy of its characters' frequencies (random hex: 4 bits a character)
ANONYMOUS = "anonymous"  # the key id label of requests without a key
REFUSED = "refused"  # the key id label of requests refused for their key
RESERVED_IDS = {ANONYMOUS, REFUSED}


@dataclass(frozen=True)
class ApiKeys:
    """The configured keys: ``(id, key)`` pairs (empty: keys are off)."""

    entries: tuple[tuple[str, bytes], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.entries)

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(key_id for key_id, _ in self.entries)

    def identify(self, key: str) -> str | None:
        """The id of ``key``, or None; compared with every key in constant time (no early exit)."""
        given = key.encode("utf-8", "replace")
        found = None
        for key_id, secret in self.entries:
            if hmac.compare_digest(given, secret) and found is None:
                found = key_id
        return found

    @classmethod
    def from_env(cls, env: Env) -> ApiKeys:
        """API_KEYS (entries separated by spaces or commas) and API_KEYS_FILE (one entry per line)."""
        return cls.parse(env.list("API_KEYS"), env.str("API_KEYS_FILE", ""))

    @classmethod
    def parse(cls, listed: tuple[str, ...], path: str) -> ApiKeys:
        """The ``listed`` entries (API_KEYS) and those of the file at ``path`` (if any)."""
        entries = [("API_KEYS", entry) for entry in listed]
        if path:
            entries += [("API_KEYS_FILE", line) for line in _read_key_file(path)]
        return cls(_parse_entries(entries))


FileVersion = tuple[int, int, int] | None  # (inode, mtime in ns, size) of the key file; None: unreadable


class KeyRing:
    """The keys in force: API_KEYS, and API_KEYS_FILE, read again when its file changes.

    A Kubernetes Secret mounted as a directory is updated in place when the Secret changes (within
    about a minute): the file is looked at (one ``stat``) at most every ``reload_interval_s`` (0:
    never again), and re-read when its inode, modification time or size changed. A new version that
    does not parse, or lists no key at all, is refused: the keys in force stay (logged, naming the
    entry, never a key); turning keys off takes a restart without them. Keys on or off is fixed at
    start (``bool``).
    """

    def __init__(
        self,
        listed: tuple[str, ...],
        path: str,
        *,
        reload_interval_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._listed, self._path = listed, path
        self._interval, self._clock = reload_interval_s, clock
        self._version = _file_version(path)
        self._keys = ApiKeys.parse(listed, path)  # ConfigError at start-up: the gateway does not start
        self._checked = clock()

    @classmethod
    def from_env(cls, env: Env) -> KeyRing:
        """API_KEYS, API_KEYS_FILE and API_KEYS_RELOAD_SECONDS (default 30)."""
        interval = env.float("API_KEYS_RELOAD_SECONDS", 30.0, minimum=0.0)
        return cls(env.list("API_KEYS"), env.str("API_KEYS_FILE", ""), reload_interval_s=interval)

    def __bool__(self) -> bool:
        return bool(self._keys)

    def identify(self, key: str) -> str | None:
        """The id of ``key`` among the keys in force, or None (constant time, as ``ApiKeys.identify``)."""
        return self.current().identify(key)

    def current(self) -> ApiKeys:
        """The keys in force, after reading the key file again if it changed."""
        now = self._clock()
        if self._path and self._interval and now - self._checked >= self._interval:
            self._checked = now
            version = _file_version(self._path)
            if version != self._version:
                self._version = version
                self._reload()
        return self._keys

    def _reload(self) -> None:
        try:
            keys = ApiKeys.parse(self._listed, self._path)
        except ConfigError as error:
            logger.error("API keys not reloaded, the %d keys in force stay: %s", len(self._keys.entries), error)
            return
        if not keys:
            logger.error("API keys not reloaded: API_KEYS_FILE lists no key; turning keys off takes a restart")
            return
        self._keys = keys
        logger.info("API keys reloaded from API_KEYS_FILE: ids %s", ", ".join(keys.ids))


def _file_version(path: str) -> FileVersion:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


def _read_key_file(path: str) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"API_KEYS_FILE {path!r} cannot be read ({type(error).__name__})") from None
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _parse_entries(entries: list[tuple[str, str]]) -> tuple[tuple[str, bytes], ...]:
    """Validated ``(id, key)`` pairs; errors name the entry and its id, never the key."""
    parsed: dict[str, bytes] = {}
    for number, (source, entry) in enumerate(entries, start=1):
        key_id, sep, key = entry.partition(":")
        where = f"{source} entry {number}"
        if not sep or not KEY_ID_PATTERN.match(key_id):
            raise ConfigError(f"{where} must be ID:KEY with an ID of 1-32 letters, digits, '.', '_' or '-'")
        if key_id in RESERVED_IDS or key_id in parsed:
            raise ConfigError(f"{where}: the id {key_id!r} is reserved or given twice")
        if not (MIN_KEY_CHARS <= len(key) <= MAX_KEY_CHARS) or not KEY_PATTERN.match(key):
            raise ConfigError(
                f"{where} (id {key_id!r}): the key must be {MIN_KEY_CHARS}-{MAX_KEY_CHARS} printable ASCII characters"
            )
        if weak(key):
            raise ConfigError(
                f"{where} (id {key_id!r}): the key is too weak (under {MIN_KEY_DISTINCT} distinct characters or too "
                "repetitive): use a random one, e.g. 'openssl rand -hex 16'"
            )
        if key.encode() in parsed.values():
            raise ConfigError(f"{where} (id {key_id!r}): the same key is given to another id")
        parsed[key_id] = key.encode()
    return tuple(parsed.items())


def weak(key: str) -> bool:
    """Whether ``key`` has too few distinct characters, or too little entropy as its characters'
    frequencies estimate it (an upper bound: it catches repetition, not a guessable word)."""
    counts = Counter(key).values()
    bits = -sum(count * math.log2(count / len(key)) for count in counts)
    return len(counts) < MIN_KEY_DISTINCT or bits < MIN_KEY_BITS
