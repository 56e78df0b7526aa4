"""gunicorn settings for the ui service (stateless static files, several workers).

gunicorn's stock threaded worker: the ui's clients are the gateway and the Ingress controller, and
the hardened one (services/common/gunicorn/gthread_worker.py) measured no faster nor leaner here
(bench/internal_worker.py).
"""

from services.common.gunicorn.settings import STOCK_GTHREAD_WORKER, child_exit, service_config
from services.ui.settings import UiSettings

globals().update(
    service_config(
        "ui", UiSettings.from_env, "services.ui.app:create_app()", worker_class=STOCK_GTHREAD_WORKER, check_worker=None
    )
)
__all__ = ["child_exit"]  # gunicorn's hook: forget a dead worker's live gauges
