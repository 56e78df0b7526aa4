"""gunicorn settings for the gateway: stateless, several workers, metrics in multiprocess mode.

Settings are validated here, in the master, so a bad environment stops the gateway at start
with one clear line.
"""

from services.common.config import load_or_exit
from services.common.gunicorn import child_exit, common_settings, prepare_multiprocess_metrics
from services.gateway.settings import GatewaySettings

_settings = load_or_exit(GatewaySettings.from_env, "gateway")
prepare_multiprocess_metrics()
globals().update(
    common_settings(
        wsgi_app="services.gateway.app:create_app()",
        bind=_settings.bind,
        workers=_settings.workers,
        threads=_settings.threads,
        log_level=_settings.log_level,
    )
)

__all__ = ["child_exit"]  # gunicorn's hook, from the shared module
