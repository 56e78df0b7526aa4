"""gunicorn settings shared by the services' config files (``services/*/gunicorn.conf.py``)."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from typing import Any

from services.common.gunicorn import gthread_worker
from services.common.startup.config import ServerSettings, load_or_exit
from services.common.startup.patching import PatchError
from services.common.web import request_id

GTHREAD_WORKER = "services.common.gunicorn.gthread_worker.Worker"  # gthread, safe from idle/stalled clients
STOCK_GTHREAD_WORKER = "gthread"  # gunicorn's own: where ours measured no better (bench/internal_worker.py)


def service_config(
    service: str,
    load_settings: Callable[[], Any],
    wsgi_app: str,
    worker_env: Callable[[Any], dict[str, str]] | None = None,
    worker_class: str = GTHREAD_WORKER,
    check_worker: Callable[[], None] | None = gthread_worker.check,
) -> dict[str, Any]:
    """gunicorn settings of a service, its environment validated first (a config file does
    ``globals().update(service_config(...))``): a bad value stops the master with one clear line.

    ``worker_env(settings)`` names variables the workers must start with (set here, before they fork).
    ``worker_class``: our threaded worker or gunicorn's (WSGI apps), or an event-loop worker (the
    gateway's ASGI app; it has no request threads). ``check_worker``: raises PatchError unless the
    worker class fits the installed server library (docs/patches.md); a misfit stops the master with
    one line too. None for gunicorn's own worker, which patches nothing.
    """
    settings = load_or_exit(load_settings, service)
    if check_worker is not None:
        check_or_exit(check_worker, service)
    os.environ.update(worker_env(settings) if worker_env else {})
    server: ServerSettings = settings.server
    if server.workers > 1:
        prepare_multiprocess_metrics()
    threads = {"threads": server.threads} if worker_class in (GTHREAD_WORKER, STOCK_GTHREAD_WORKER) else {}
    return {
        "wsgi_app": wsgi_app,
        "bind": server.bind,
        "workers": server.workers,
        "worker_class": worker_class,
        **threads,
        "timeout": 120,  # both workers heartbeat from their main loop: long generations do not trip it
        "graceful_timeout": 60,  # in-flight requests finish on SIGTERM (scale-down, rollout)
        "keepalive": 75,
        "loglevel": server.log_level,
        "errorlog": "-",
        # No gunicorn control socket: nothing uses it, and it wants a writable home directory
        # (the images have none) and one fixed path shared by every master on a host.
        "control_socket_disable": True,
        "accesslog": "-" if server.access_log else None,
        "access_log_format": '%(h)s "%(r)s" %(s)s %(b)s %(M)sms',
        "post_request": end_request,
    }


def check_or_exit(check: Callable[[], None], service: str) -> None:
    """Run a patch's fit check; on a PatchError print its line and exit with status 2."""
    try:
        check()
    except PatchError as error:
        print(f"{service}: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def end_request(worker: Any, req: Any, environ: dict, resp: Any) -> None:
    """gunicorn hook, after a request's access line: its thread serves no request until the next one
    (a line gunicorn logs meanwhile names no request id). The event-loop worker never calls it."""
    request_id.end()


def prepare_multiprocess_metrics() -> None:
    """Give prometheus-client a shared directory before the workers fork (several workers)."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="petals-chat-metrics-")


def child_exit(server: Any, worker: Any) -> None:
    """gunicorn hook (import it into a config file): drop a dead worker's live gauges."""
    from prometheus_client import multiprocess

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(worker.pid)
