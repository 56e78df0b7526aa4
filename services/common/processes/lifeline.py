"""Child processes in sessions of their own that still die with the process that started them.

The local stack (deploy/local_stack.py) and the private swarm (services/swarm/launcher.py) start
each gunicorn master and Petals server with ``spawn``: in a session (and process group) of its
own, so that it can be stopped by its group id without touching anything else, and so that a
Ctrl-C at a terminal reaches only the runner, which then stops them in order.

A session of its own also means nothing ends it when its starter dies without stopping it
(SIGKILL, a supervisor's timeout). ``prctl(PR_SET_PDEATHSIG)`` is not enough: it reaches only the
direct child (a Petals server's connection-handler forks and p2pd were measured still running
30 s after their server was SIGKILLed), and it fires when the *thread* that forked the child
ends. So the first ``spawn`` also starts a watchdog (``python -m services.common.processes.lifeline``, in
a session of its own too): it reads the ids of the groups to guard from a pipe whose only write
end is held by the starting process, and when that pipe reaches end-of-file (the starter has
exited, by any means, SIGKILL included) it SIGKILLs every group it still guards, then exits. A
group stopped on purpose is dropped with ``kill_group`` (its final SIGKILL of stragglers).

The starter's forks (``os.fork``, multiprocessing) close their copy of the write end at once, so
that only the starter's own death ends the pipe. One process leaves its group by design: torch's
``torch_shm_manager`` daemonizes itself (a session of its own), and exits by itself once the last
process using it is gone (tests/integration/test_run_local.py sees it go within seconds).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_REPO_ROOT = Path(__file__).resolve().parents[3]
_lock = threading.Lock()
_write_fd: int | None = None  # this process's end of the pipe to its watchdog
_guarded: set[int] = set()  # the groups the watchdog is told to kill if this process dies


def spawn(args: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen:
    """``subprocess.Popen`` in a new session whose whole group is SIGKILLed if this process dies
    before calling ``kill_group`` for it."""
    with _lock:
        _ensure_watchdog()  # first, so that no child is ever unguarded
        process = subprocess.Popen(args, start_new_session=True, **popen_kwargs)
        _guarded.add(process.pid)
        _tell(b"+%d\n" % process.pid)
    return process


def kill_group(pgid: int) -> None:
    """SIGKILL what is left of a group started by ``spawn``, and stop guarding it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    with _lock:
        if pgid in _guarded:
            _guarded.discard(pgid)
            _tell(b"-%d\n" % pgid)


def _ensure_watchdog() -> None:
    """Start this process's watchdog unless it runs; tell it every group guarded so far."""
    global _write_fd
    if _write_fd is not None:
        return
    read_fd, write_fd = os.pipe()  # neither end inherited by other children (close-on-exec)
    try:
        subprocess.Popen(
            [sys.executable, "-m", "services.common.processes.lifeline"],
            cwd=_REPO_ROOT,
            stdin=read_fd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a kill of the starter's group must not take the watchdog too
        )
    except BaseException:
        os.close(write_fd)
        raise
    finally:
        os.close(read_fd)
    _write_fd = write_fd
    if _guarded:
        os.write(write_fd, b"".join(b"+%d\n" % pgid for pgid in _guarded))


def _tell(message: bytes) -> None:
    """One line to the watchdog (a single atomic write to a pipe); restart it if it died."""
    global _write_fd
    try:
        os.write(_write_fd, message)
    except OSError:  # the watchdog is gone (killed by hand): a new one gets every guarded group
        os.close(_write_fd)
        _write_fd = None
        _ensure_watchdog()


def _forget_in_fork() -> None:
    """A fork must not keep the pipe open (its parent's death would go unnoticed) nor guard anything."""
    global _write_fd, _lock
    _lock = threading.Lock()  # another thread may have held it at the fork
    if _write_fd is not None:
        os.close(_write_fd)
        _write_fd = None
    _guarded.clear()


os.register_at_fork(after_in_child=_forget_in_fork)


def watch(stream: Any = None) -> None:
    """The watchdog: track ``+PGID`` / ``-PGID`` lines; at end-of-file, SIGKILL the groups left."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    groups: set[int] = set()
    for line in stream if stream is not None else sys.stdin.buffer:
        with contextlib.suppress(ValueError):
            pgid = int(line[1:])
            (groups.add if line.startswith(b"+") else groups.discard)(pgid)
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


if __name__ == "__main__":
    watch()
