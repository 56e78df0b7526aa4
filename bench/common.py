"""Helpers shared by the benchmarks: the machine's description and signal handling."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def _proc_field(path: str, name: str) -> str | None:
    """The value of the first ``name: value`` line of a /proc file, if any."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.split(":", 1)[0].strip() == name), None)


def machine_description() -> str:
    """CPU model and count, RAM, OS, Python and torch versions, on one line."""
    import torch

    cpu = _proc_field("/proc/cpuinfo", "model name") or platform.processor() or platform.machine()
    mem_kib = _proc_field("/proc/meminfo", "MemTotal")
    ram = f"{int(mem_kib.split()[0]) / 2**20:.1f} GiB RAM" if mem_kib else "RAM unknown"
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"{cpu}, {os.cpu_count()} CPUs ({usable} usable), {ram}, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )


def load_average() -> str:
    """The 1/5/15-minute load averages (other processes share this machine)."""
    return "/".join(f"{load:.2f}" for load in os.getloadavg())


def exit_on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM handler (e.g. from ``timeout``): unwind, so ``finally`` blocks stop what was started."""
    raise SystemExit(128 + signum)
