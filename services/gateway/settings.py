"""The gateway's settings, read from the environment (see README, Configuration)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from services.common.chat import DEFAULT_PREAMBLE
from services.common.config import ConfigError, Env, ServerSettings
from services.common.params import MAX_STOP_CHARS, SESSION_ID_PATTERN, Limits
from services.gateway.chat_template import DEFAULT_CHAT_STOP, DEFAULT_CHAT_TEMPLATE, ChatTemplate


@dataclass(frozen=True)
class GatewaySettings:
    """Everything the gateway reads from its environment."""

    server: ServerSettings
    replicas: dict[str, str]  # replica id -> base URL
    connect_timeout_s: float
    read_timeout_s: float
    poll_interval_s: float
    rate_limit_per_minute: int
    rate_limit_burst: int
    trust_proxy_headers: bool
    cors_allow_origins: tuple[str, ...]
    ui_url: str
    limits: Limits
    chat_template: ChatTemplate
    chat_stop: tuple[str, ...]
    debug_tracebacks: bool

    @classmethod
    def from_env(cls, env: Env | None = None) -> GatewaySettings:
        """Read and validate every setting; raises ConfigError with a clear message."""
        env = env or Env()
        return cls(
            server=ServerSettings.from_env(env, bind="127.0.0.1:8080", threads=64, workers=2),
            replicas=parse_replicas(env.list("INFERENCE_REPLICAS")),
            connect_timeout_s=env.float("UPSTREAM_CONNECT_TIMEOUT_SECONDS", 1.0, minimum=0.05),
            read_timeout_s=env.float("UPSTREAM_READ_TIMEOUT_SECONDS", 300.0, minimum=1.0),
            poll_interval_s=env.float("REPLICA_POLL_INTERVAL_SECONDS", 2.0, minimum=0.1),
            rate_limit_per_minute=env.int("RATE_LIMIT_PER_MINUTE", 0, minimum=0),
            rate_limit_burst=env.int("RATE_LIMIT_BURST", 20, minimum=1),
            trust_proxy_headers=env.bool("TRUST_PROXY_HEADERS", False),
            cors_allow_origins=env.list("CORS_ALLOW_ORIGINS", ("*",)),
            ui_url=parse_ui_url(env.str("UI_URL", "")),
            limits=Limits.from_env(env),
            chat_template=ChatTemplate(read_chat_template(env), env.text("CHAT_SYSTEM_PROMPT", DEFAULT_PREAMBLE)),
            chat_stop=parse_chat_stop(env.text("CHAT_STOP", DEFAULT_CHAT_STOP)),
            debug_tracebacks=env.bool("DEBUG_TRACEBACKS", False),
        )


def read_chat_template(env: Env) -> str:
    """CHAT_TEMPLATE (Jinja2 source), or the file CHAT_TEMPLATE_FILE names, or the default."""
    inline, path = env.str("CHAT_TEMPLATE", ""), env.str("CHAT_TEMPLATE_FILE", "")
    if inline and path:
        raise ConfigError("Set CHAT_TEMPLATE or CHAT_TEMPLATE_FILE, not both")
    if not path:
        return inline or DEFAULT_CHAT_TEMPLATE
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"CHAT_TEMPLATE_FILE {path!r} cannot be read: {error}") from None


def parse_chat_stop(value: str) -> tuple[str, ...]:
    """The chat API's default stop sequence (none when set to ``none``)."""
    if value == "none":
        return ()
    if len(value) > MAX_STOP_CHARS:
        raise ConfigError(f"CHAT_STOP must be at most {MAX_STOP_CHARS} characters, got {len(value)}")
    return (value,)


def parse_ui_url(value: str) -> str:
    """Optional base URL of the ui service (non-API paths are forwarded there)."""
    url = value.rstrip("/")
    if url and not re.match(r"^https?://[^/\s]+$", url):
        raise ConfigError(f"UI_URL must be http(s)://HOST:PORT, got {value!r}")
    return url


def parse_replicas(entries: tuple[str, ...]) -> dict[str, str]:
    """``inference-0=http://host:port`` entries; the id is what session ids start with."""
    if not entries:
        raise ConfigError("INFERENCE_REPLICAS is required: e.g. 'inference-0=http://127.0.0.1:8000'")
    replicas: dict[str, str] = {}
    for entry in entries:
        name, sep, url = entry.partition("=")
        if not sep or not SESSION_ID_PATTERN.match(name) or not re.match(r"^https?://[^/\s]+$", url.rstrip("/")):
            raise ConfigError(f"INFERENCE_REPLICAS entry must be ID=http://HOST:PORT, got {entry!r}")
        if name in replicas:
            raise ConfigError(f"INFERENCE_REPLICAS names {name!r} twice")
        replicas[name] = url.rstrip("/")
    return replicas
