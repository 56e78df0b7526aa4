"""gunicorn settings for the gateway: stateless, several workers (Uvicorn's: an event loop each),
metrics in multiprocess mode."""

import resource

from services.common.gunicorn.settings import child_exit, service_config
from services.gateway.http_protocol import check as check_http_protocol
from services.gateway.settings import GatewaySettings

# Each open connection (a WebSocket held for a whole chat) is a file descriptor: lift the soft
# limit to the hard one (the workers inherit it).
_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if _soft < _hard:
    resource.setrlimit(resource.RLIMIT_NOFILE, (_hard, _hard))

_WORKER = "services.gateway.worker.Worker"  # Uvicorn's, see services/gateway/worker.py
globals().update(
    service_config(
        "gateway",
        GatewaySettings.from_env,
        "services.gateway.app:create_app()",
        worker_class=_WORKER,
        check_worker=check_http_protocol,  # its protocols fit uvicorn's internals (docs/patches.md)
    )
)
backlog = 4096  # a burst of new connections (clients reconnecting after a restart) waits in the kernel
__all__ = ["child_exit"]  # gunicorn's hook: forget a dead worker's live gauges
