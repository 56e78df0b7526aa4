"""The gateway's settings, read from the environment (see docs/configuration.md)."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from services.common.api.discovery import Discovery, parse_discovery
from services.common.api.params import MODEL_NAME_PATTERN, Limits
from services.common.api.replica_urls import parse_replica_urls
from services.common.startup.config import ConfigError, Env, ServerSettings
from services.gateway.api_keys import KeyRing
from services.gateway.socket_protocol import largest_message_bytes

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class GatewaySettings:
    """Everything the gateway reads from its environment."""

    server: ServerSettings
    replicas: dict[str, str]  # replica id -> base URL (INFERENCE_REPLICAS: static, never forgotten)
    discovery: Discovery  # INFERENCE_DISCOVERY: the replicas found by themselves (empty: none)
    cold_start_retry_s: int  # Retry-After of a request for a discovered model that has no replica running
    connect_timeout_s: float
    read_timeout_s: float
    poll_interval_s: float
    rate_limit_per_minute: int
    rate_limit_burst: int
    trusted_proxies: tuple[IpNetwork, ...]  # X-Forwarded-For is honoured from these peers only; (): from none
    api_keys: KeyRing  # empty: keys are off
    anonymous_rate_limit_per_minute: int  # with keys: > 0 lets clients without a key in, at this rate
    auth_failures_per_minute: int  # refused keys per address before 429 (0: unlimited)
    cors_allow_origins: tuple[str, ...]
    ui_url: str
    limits: Limits
    default_model: str | None  # None: the model of the first replica that reports one
    debug_tracebacks: bool
    ws_idle_timeout_s: float  # a WebSocket with no message (and no answer running) this long is closed
    ws_max_message_bytes: int  # larger messages get an error answer; over 2x, the connection is closed
    ws_max_connections_per_client: int  # open WebSockets of one client per worker; 0: no limit
    openai_max_choices: int = 4  # the OpenAI API's n and best_of: generations one request may run

    @classmethod
    def from_env(cls, env: Env | None = None) -> GatewaySettings:
        """Read and validate every setting; raises ConfigError with a clear message."""
        env = env or Env()
        limits = Limits.from_env(env)
        api_keys = KeyRing.from_env(env)
        discovery = parse_discovery(env)
        return cls(
            server=ServerSettings.from_env(env, bind="127.0.0.1:8080", threads=1, workers=2),
            replicas=parse_replicas(env.list("INFERENCE_REPLICAS"), discovery),
            discovery=discovery,
            cold_start_retry_s=env.int("INFERENCE_COLD_START_RETRY_SECONDS", 15, minimum=1, maximum=3600),
            connect_timeout_s=env.float("UPSTREAM_CONNECT_TIMEOUT_SECONDS", 1.0, minimum=0.05),
            read_timeout_s=env.float("UPSTREAM_READ_TIMEOUT_SECONDS", 300.0, minimum=1.0),
            poll_interval_s=env.float("REPLICA_POLL_INTERVAL_SECONDS", 2.0, minimum=0.1),
            rate_limit_per_minute=env.int("RATE_LIMIT_PER_MINUTE", 0, minimum=0),
            rate_limit_burst=env.int("RATE_LIMIT_BURST", 20, minimum=1),
            trusted_proxies=parse_trusted_proxies(env),
            api_keys=api_keys,
            anonymous_rate_limit_per_minute=anonymous_rate(env, api_keys),
            auth_failures_per_minute=env.int("AUTH_FAILURES_PER_MINUTE", 30, minimum=0),
            cors_allow_origins=env.list("CORS_ALLOW_ORIGINS", ("*",)),
            ui_url=parse_ui_url(env.str("UI_URL", "")),
            limits=limits,
            default_model=parse_default_model(env.str("DEFAULT_MODEL", "")),
            debug_tracebacks=env.bool("DEBUG_TRACEBACKS", False),
            ws_idle_timeout_s=env.float("WS_IDLE_TIMEOUT_SECONDS", 240.0, minimum=1.0),
            ws_max_message_bytes=env.int("WS_MAX_MESSAGE_BYTES", largest_message_bytes(limits), minimum=1024),
            ws_max_connections_per_client=env.int("WS_MAX_CONNECTIONS_PER_CLIENT", 16, minimum=0),
            openai_max_choices=env.int("OPENAI_MAX_CHOICES", 4, minimum=1, maximum=128),
        )


def anonymous_rate(env: Env, api_keys: KeyRing) -> int:
    """ANONYMOUS_RATE_LIMIT_PER_MINUTE: only meaningful with keys (without, every client is anonymous)."""
    rate = env.int("ANONYMOUS_RATE_LIMIT_PER_MINUTE", 0, minimum=0)
    if rate and not api_keys:
        raise ConfigError("ANONYMOUS_RATE_LIMIT_PER_MINUTE needs API_KEYS or API_KEYS_FILE; else RATE_LIMIT_PER_MINUTE")
    return rate


def parse_trusted_proxies(env: Env) -> tuple[IpNetwork, ...]:
    """TRUSTED_PROXIES: the addresses or CIDRs of the proxies whose X-Forwarded-For is honoured (as
    uvicorn's ``forwarded_allow_ips``). It replaces TRUST_PROXY_HEADERS, which trusted any peer."""
    if env.bool("TRUST_PROXY_HEADERS", False):
        raise ConfigError("TRUST_PROXY_HEADERS is replaced by TRUSTED_PROXIES: list the proxies' addresses or CIDRs")
    networks = []
    for entry in env.list("TRUSTED_PROXIES"):
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ConfigError(f"TRUSTED_PROXIES entries must be addresses or CIDRs, got {entry!r}") from None
    return tuple(networks)


def parse_default_model(value: str) -> str | None:
    """DEFAULT_MODEL: the model of requests that name none (empty: the first replica's)."""
    if value and not MODEL_NAME_PATTERN.match(value):
        raise ConfigError(f"DEFAULT_MODEL must be a model name (a replica's MODEL_NAME), got {value!r}")
    return value or None


def parse_ui_url(value: str) -> str:
    """Optional base URL of the ui service (non-API paths are forwarded there)."""
    url = value.rstrip("/")
    if url and not re.match(r"^https?://[^/\s]+$", url):
        raise ConfigError(f"UI_URL must be http(s)://HOST:PORT, got {value!r}")
    return url


def parse_replicas(entries: tuple[str, ...], discovery: Discovery) -> dict[str, str]:
    """``inference-0=http://host:port`` entries; the id is what session ids start with. Without
    them, INFERENCE_DISCOVERY must find the replicas."""
    if not entries and not discovery:
        raise ConfigError(
            "INFERENCE_REPLICAS or INFERENCE_DISCOVERY is required: e.g. 'inference-0=http://127.0.0.1:8000' "
            "or 'my-model=dns://inference-my-model:8000'"
        )
    return parse_replica_urls(entries, "INFERENCE_REPLICAS")
