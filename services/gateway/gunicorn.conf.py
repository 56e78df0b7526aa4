"""gunicorn settings for the gateway: stateless, several workers, metrics in multiprocess mode."""

from services.common.gunicorn import child_exit, service_config
from services.gateway.settings import GatewaySettings

globals().update(service_config("gateway", GatewaySettings.from_env, "services.gateway.app:create_app()"))
__all__ = ["child_exit"]  # gunicorn's hook: forget a dead worker's live gauges
