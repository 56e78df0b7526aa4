"""gunicorn settings for the ui service (stateless static files, several workers)."""

from services.common.gunicorn.settings import child_exit, service_config
from services.ui.settings import UiSettings

globals().update(service_config("ui", UiSettings.from_env, "services.ui.app:create_app()"))
__all__ = ["child_exit"]  # gunicorn's hook: forget a dead worker's live gauges
