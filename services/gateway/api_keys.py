"""The operator's API keys (``API_KEYS``, ``API_KEYS_FILE``): ``id:key`` entries, validated at start-up.

Errors name an entry by its number and id, never its key. Lookups compare the key with every
configured key in constant time. (No metrics here: the settings import this before the gateway's
workers have their multiprocess metrics directory.)
"""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass
from pathlib import Path

from services.common.config import ConfigError, Env

KEY_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")
KEY_PATTERN = re.compile(r"^[\x21-\x7e]+$")  # printable ASCII, no spaces
MIN_KEY_CHARS = 16
MAX_KEY_CHARS = 256
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
        entries = [("API_KEYS", entry) for entry in env.list("API_KEYS")]
        path = env.str("API_KEYS_FILE", "")
        if path:
            entries += [("API_KEYS_FILE", line) for line in _read_key_file(path)]
        return cls(_parse_entries(entries))


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
        if key.encode() in parsed.values():
            raise ConfigError(f"{where} (id {key_id!r}): the same key is given to another id")
        parsed[key_id] = key.encode()
    return tuple(parsed.items())
