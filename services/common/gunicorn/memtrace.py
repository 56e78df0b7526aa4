"""A debug hook for hunting memory growth, off unless ``TRACEMALLOC_DIR`` is set (never in production).

With it set, a gunicorn worker's first SIGUSR2 starts ``tracemalloc`` (``TRACEMALLOC_FRAMES``
frames per allocation, default 10; from then on, not while the model loads), and each later one
writes a snapshot (after a full garbage collection) to ``$TRACEMALLOC_DIR/snapshot-<pid>-<n>.pickle``
(``bench/memory.py`` sends them). Tracing slows the worker and costs memory of its own: measure
RSS without it.
"""

from __future__ import annotations

import gc
import itertools
import os
import signal
import tracemalloc
from pathlib import Path

DIR_ENV = "TRACEMALLOC_DIR"
FRAMES_ENV = "TRACEMALLOC_FRAMES"


def install() -> bool:
    """Arm SIGUSR2 if ``TRACEMALLOC_DIR`` is set; returns whether it did."""
    directory = os.environ.get(DIR_ENV)
    if not directory:
        return False
    numbers = itertools.count()

    def dump(signum: int, frame: object) -> None:
        if not tracemalloc.is_tracing():
            tracemalloc.start(int(os.environ.get(FRAMES_ENV, "10")))
            return
        gc.collect()
        path = Path(directory) / f"snapshot-{os.getpid()}-{next(numbers):03d}.pickle"
        tracemalloc.take_snapshot().dump(f"{path}.part")
        os.replace(f"{path}.part", path)  # readers see whole files only

    signal.signal(signal.SIGUSR2, dump)
    return True
