"""Metrics of a Petals server's merged inference pool with batching on (services/swarm/batching_pool.py).

Recorded by the runtime thread of the server's main process when it takes a pass (a batched group or
one step alone) and served by that process over HTTP on SWARM_METRICS_PORT (0: not served). One bounded
label: ``path`` of ``petals_chat_swarm_steps_total`` (``STEP_PATHS``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from prometheus_client import Counter, Histogram, start_http_server

PORT_ENV = "SWARM_METRICS_PORT"
PASS_SESSIONS = Histogram(
    "petals_chat_swarm_pass_sessions",
    "Sessions whose inference steps one pass of a server's merged pool ran (1: alone, through Petals' own step).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
QUEUE_WAIT = Histogram(
    "petals_chat_swarm_queue_wait_seconds",
    "Time each inference step waited in a server's queue, from its submission by a handler to its pass.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)

STEP_PATHS = ("batched", "alone", "fallback")
STEPS = Counter(
    "petals_chat_swarm_steps",
    "Inference steps a server's merged pool ran, by path: batched (in one pass with others), alone (Petals' own "
    "step: nothing to batch with, or a step that cannot batch), fallback (its batched pass failed, re-run alone).",
    ["path"],
)
for _path in STEP_PATHS:
    STEPS.labels(_path)  # every path exported from the start, at 0


def count_steps(path: str, steps: int = 1) -> None:
    """``steps`` inference steps that ran through ``path`` (one of ``STEP_PATHS``)."""
    STEPS.labels(path).inc(steps)


def observe_pass(submitted: Iterable[float], now: float | None = None) -> None:
    """One pass of the steps submitted at ``submitted`` (``time.monotonic()``, system-wide on Linux, so
    comparable across the server's processes)."""
    now = time.monotonic() if now is None else now
    times = list(submitted)
    PASS_SESSIONS.observe(len(times))
    for time_submitted in times:
        QUEUE_WAIT.observe(max(0.0, now - time_submitted))


def serve(port: int, host: str = "0.0.0.0") -> None:  # all interfaces: scraped from outside the pod
    """Serve this process's metrics on ``host:port`` (a daemon thread), if ``port``."""
    if port:
        start_http_server(port, addr=host)
