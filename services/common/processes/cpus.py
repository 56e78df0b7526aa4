"""How many CPUs this process may really use, and which torch dtype is fast on them.

torch sizes its intra-op thread pool by the cores it sees, which in a container are the node's,
not the CPU quota the container gets; and a Petals server is several processes (a dozen with
Petals' 8 connection handlers), each with such a pool. Both oversubscribe the cores (see
docs/deploying.md, Threads and dtype). These helpers read what the kernel grants (affinity and the
cgroup CPU quota) so each process can size its pool, and a server its handlers, to that.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

_CGROUP_V2_MAX = Path("/sys/fs/cgroup/cpu.max")
_CGROUP_V1_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
_CGROUP_V1_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")


def cgroup_cpu_quota() -> float | None:
    """The cgroup's CPU quota in cores (e.g. 1.5), or None when unlimited or unknown."""
    try:
        if _CGROUP_V2_MAX.exists():
            quota, period = _CGROUP_V2_MAX.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        quota = int(_CGROUP_V1_QUOTA.read_text())
        return None if quota <= 0 else quota / int(_CGROUP_V1_PERIOD.read_text())
    except (OSError, ValueError):
        return None


def available_cpus() -> int:
    """CPUs this process may run on: its affinity, capped by the cgroup quota (rounded up), at least 1."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    return max(1, min(usable, math.ceil(quota)) if quota else usable)


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether the CPU multiplies bfloat16 matrices natively (Intel AMX).

    AVX512-BF16 alone was not enough for Petals' own head: on an AMD EPYC that has it, its bfloat16
    LM head took 1.7x as long as float32 (bench/lm_head.py; the service's ``torch.mv`` head, which
    is 3x faster than Petals' on an AMX Xeon, was not measured there).
    """
    try:
        flags = next((line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return False
    return "amx_bf16" in flags.split()
