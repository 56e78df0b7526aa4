"""Probes of running services from outside, through /proc: their process trees, memory and file
descriptors, and polling until a condition holds (tests and benchmarks alike)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (e.g. a gunicorn master and its workers), from /proc."""
    pids, index = [pid], 0
    while index < len(pids):
        for task in Path(f"/proc/{pids[index]}/task").glob("*"):
            try:
                pids.extend(int(child) for child in (task / "children").read_text().split())
            except (FileNotFoundError, ProcessLookupError):
                continue
        index += 1
    return pids


def rss_bytes(pid: int) -> int:
    """Resident memory of one process (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"no VmRSS for process {pid}")


def open_fds(pid: int) -> int:
    """Open file descriptors of one process."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_until(condition: Callable[[], object], timeout: float, interval: float = 0.25) -> bool:
    """Poll ``condition()`` until it is true or ``timeout`` seconds pass; says whether it came true."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
