"""gunicorn settings for the ui service (stateless static files, several workers)."""

from services.common.config import load_or_exit
from services.common.gunicorn import child_exit, common_settings, prepare_multiprocess_metrics
from services.ui.settings import UiSettings

_settings = load_or_exit(UiSettings.from_env, "ui")
prepare_multiprocess_metrics()
globals().update(
    common_settings(
        wsgi_app="services.ui.app:create_app()",
        bind=_settings.bind,
        workers=_settings.workers,
        threads=_settings.threads,
        log_level=_settings.log_level,
    )
)

__all__ = ["child_exit"]  # gunicorn's hook, from the shared module
