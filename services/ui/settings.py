"""The ui service's settings, read from the environment (see docs/configuration.md)."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.startup.config import ConfigError, Env, ServerSettings


@dataclass(frozen=True)
class UiSettings:
    """Everything the ui service reads from its environment."""

    server: ServerSettings
    api_base_url: str
    session_max_length: int

    @classmethod
    def from_env(cls, env: Env | None = None) -> UiSettings:
        """Read and validate every setting; raises ConfigError with a clear message."""
        env = env or Env()
        api_base_url = env.str("API_BASE_URL", "").rstrip("/")
        if api_base_url and not api_base_url.startswith(("http://", "https://", "/")):
            raise ConfigError(
                f"API_BASE_URL must be empty (same origin), a path or an http(s) URL, got {api_base_url!r}"
            )
        return cls(
            server=ServerSettings.from_env(env, bind="127.0.0.1:8090", threads=8, workers=2),
            api_base_url=api_base_url,
            session_max_length=env.int("CHAT_SESSION_MAX_LENGTH", 1024, minimum=64, maximum=65_536),
        )
