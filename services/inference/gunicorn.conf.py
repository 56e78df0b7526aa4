"""gunicorn settings for the inference service: one worker (sessions live in its memory), many threads.

Settings are validated here, in the master, so a bad environment stops the service at start
with one clear line.
"""

from services.common.config import load_or_exit
from services.common.gunicorn import common_settings
from services.inference.settings import InferenceSettings

_settings = load_or_exit(InferenceSettings.from_env, "inference")
globals().update(
    common_settings(
        wsgi_app="services.inference.app:create_app()",
        bind=_settings.bind,
        workers=1,
        threads=_settings.threads,
        log_level=_settings.log_level,
    )
)


def worker_exit(server, worker):
    """Close every inference session before the worker exits (SIGTERM, scale-down)."""
    from services.inference.app import shutdown

    shutdown()
