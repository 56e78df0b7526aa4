"""gunicorn settings for the inference service: one worker (sessions live in its memory), many threads."""

from services.common.gunicorn import service_config
from services.inference.settings import InferenceSettings

globals().update(service_config("inference", InferenceSettings.from_env, "services.inference.app:create_app()"))


def worker_exit(server, worker):
    """Close every inference session before the worker exits (SIGTERM, scale-down)."""
    from services.inference.app import shutdown

    shutdown()
