"""Typed reading of environment variables, validated at start-up.

Every setting of every service is read through these helpers, so a bad value stops the
service at start with one clear line (``ConfigError``) instead of failing on first use.
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class ConfigError(ValueError):
    """An environment variable is missing or has a value the service cannot use."""


class Env:
    """Reads settings from a mapping (``os.environ`` by default) with validation."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = os.environ if environ is None else environ

    def _raw(self, name: str) -> str | None:
        value = self._environ.get(name)
        return None if value is None or value.strip() == "" else value.strip()

    def str(self, name: str, default: str) -> str:
        """A string setting."""
        value = self._raw(name)
        return default if value is None else value

    def text(self, name: str, default: str) -> str:
        """A text setting in which ``\\n`` stands for a newline (environment values rarely hold one)."""
        return self.str(name, default).replace("\\n", "\n")

    def int(self, name: str, default: int, *, minimum: int | None = None, maximum: int | None = None) -> int:
        """An integer setting within [minimum, maximum]."""
        value = self._raw(name)
        if value is None:
            return default
        try:
            number = int(value)
        except ValueError:
            raise ConfigError(f"{name} must be an integer, got {value!r}") from None
        _check_range(name, number, minimum, maximum)
        return number

    def float(self, name: str, default: float, *, minimum: float | None = None, maximum: float | None = None) -> float:
        """A finite float setting within [minimum, maximum]."""
        value = self._raw(name)
        if value is None:
            return default
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{name} must be a finite number, got {value!r}")
        _check_range(name, number, minimum, maximum)
        return number

    def bool(self, name: str, default: bool) -> bool:
        """A boolean setting: 1/0, true/false, yes/no, on/off."""
        value = self._raw(name)
        if value is None:
            return default
        if value.lower() in _TRUE:
            return True
        if value.lower() in _FALSE:
            return False
        raise ConfigError(f"{name} must be a boolean (1/0, true/false), got {value!r}")

    def list(self, name: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        """A comma- or whitespace-separated list."""
        value = self._raw(name)
        if value is None:
            return default
        return tuple(item for item in value.replace(",", " ").split() if item)

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        """A string setting that must be one of ``choices``."""
        value = self.str(name, default)
        if value not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        return value


@dataclass(frozen=True)
class ServerSettings:
    """How a service is served (every service has these): gunicorn's address, workers, threads; logs."""

    bind: str
    workers: int
    threads: int
    log_level: str
    access_log: bool

    @classmethod
    def from_env(cls, env: Env, *, bind: str, threads: int, workers: int | None) -> ServerSettings:
        """BIND, GUNICORN_WORKERS (unless ``workers`` is None: one worker, fixed), GUNICORN_THREADS,
        LOG_LEVEL, ACCESS_LOG."""
        address = env.str("BIND", bind)
        if not re.fullmatch(r"[\w.\-\[\]:]+:\d{1,5}", address):
            raise ConfigError(f"BIND must be HOST:PORT, got {address!r}")
        return cls(
            bind=address,
            workers=1 if workers is None else env.int("GUNICORN_WORKERS", workers, minimum=1, maximum=64),
            threads=env.int("GUNICORN_THREADS", threads, minimum=1, maximum=1024),
            log_level=env.choice("LOG_LEVEL", "info", ("debug", "info", "warning", "error")),
            access_log=env.bool("ACCESS_LOG", False),
        )


def _check_range(name: str, number: float, minimum: float | None, maximum: float | None) -> None:
    if minimum is not None and number < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {number}")
    if maximum is not None and number > maximum:
        raise ConfigError(f"{name} must be <= {maximum}, got {number}")


def load_or_exit(loader: Callable[[], T], service: str) -> T:
    """Run a settings loader; on a ConfigError print one clear line and exit with status 2."""
    try:
        return loader()
    except ConfigError as error:
        print(f"{service}: configuration error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
